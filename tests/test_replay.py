"""``dmft replay`` as a user runs it: a subprocess streaming real watch recordings to a real ``dmft serve``."""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from app.client import ActivityClient
from app.replay import load_npz_recording
from model.data import save_npz
from tools.stack import Server, dmft_command, run_service
from tools.traffic import WatchData

from .service_fixtures import HOP, WINDOW

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "recording.csv"  # 15 s of one exercise, 15 s of another
CSV_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a CSV in epoch seconds gives the session its clock
SUMMARY = re.compile(
    r"windows: (\d+)\ntransitions: (\d+)\naccuracy: ([\d.]+) \((\d+)/(\d+)\)\n"
    r"latency ms: p50 ([\d.]+)  p95 ([\d.]+)  p99 ([\d.]+)  \((\d+) chunks\)\n$"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_service(tmp_path_factory.mktemp("serve")) as running:
        yield running


def _replay(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*dmft_command(), "replay", *args], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _held_out_npz(watch_data: WatchData, tmp_path: Path, count: int = 2) -> tuple[Path, list[int]]:
    """The windows of a few held-out recordings, with their recording ids, in the dataset format."""
    recordings = watch_data.held_out_recordings()[:count]
    index = np.flatnonzero(np.isin(watch_data.recording, recordings))
    path = tmp_path / "held_out.npz"
    save_npz(path, watch_data.dataset.subset(index), recording=watch_data.recording[index])
    return path, recordings


def _write_csv(
    path: Path, samples: dict[str, np.ndarray], rate: float, label: str | None, start: float = CSV_START
) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        columns = [f"{name}_{axis}" for name in samples for axis in "xyz"]
        writer.writerow(["time", *columns, *(["label"] if label else [])])
        for i in range(len(next(iter(samples.values())))):
            values = [f"{v:.6f}" for name in samples for v in samples[name][i]]
            writer.writerow([f"{start + i / rate:.3f}", *values, *([label] if label else [])])


def test_npz_windows_are_stitched_back_into_the_recording(watch_data: WatchData, tmp_path: Path) -> None:
    path, (first, second) = _held_out_npz(watch_data, tmp_path)
    recording = load_npz_recording(path, second)
    raw = watch_data.recording_samples(second)
    windows = int((watch_data.recording == second).sum())
    length = (windows - 1) * HOP + WINDOW
    for name, samples in recording.samples.items():
        np.testing.assert_array_equal(samples, raw[name][:length].astype(np.float32))
    assert set(recording.labels.tolist()) == {watch_data.recording_label(second)}
    # Without --recording: the recording of the file's first window.
    default = load_npz_recording(path, None).samples["gyroscope"]
    np.testing.assert_array_equal(default, load_npz_recording(path, min(first, second)).samples["gyroscope"])


def test_replay_npz_at_max_speed_reports_every_window_and_its_accuracy(
    server: Server, watch_data: WatchData, tmp_path: Path
) -> None:
    path, (_, recording) = _held_out_npz(watch_data, tmp_path)
    result = _replay(
        str(path), "--session", "replay-npz", "--speed", "max", "--url", server.base, "--recording", str(recording)
    )
    assert result.returncode == 0, result.stderr
    summary = SUMMARY.search(result.stdout)
    assert summary is not None, result.stdout
    windows, transitions, accuracy, correct, scored, *_, chunks = summary.groups()
    expected = int((watch_data.recording == recording).sum())
    assert int(windows) == int(scored) == expected
    assert float(accuracy) > 0.5 and int(correct) == round(float(accuracy) * expected)
    assert int(transitions) >= 1 and int(chunks) == -(-((expected - 1) * HOP + WINDOW) // 50)
    assert len(re.findall(r"^window ", result.stdout, flags=re.M)) == expected
    label = watch_data.recording_label(recording)
    assert re.search(rf"^transition  unknown -> {label} ", result.stdout, flags=re.M), result.stdout


def test_replay_csv_round_trip_keeps_the_csv_clock(server: Server, watch_data: WatchData, tmp_path: Path) -> None:
    recording = watch_data.held_out_recordings()[0]
    samples = watch_data.recording_samples(recording)
    path = tmp_path / "recording.csv"
    _write_csv(path, samples, 50.0, watch_data.recording_label(recording))
    result = _replay(
        str(path), "--session", "replay-csv", "--speed", "max", "--url", server.base, "--chunk-seconds", "2.5"
    )
    assert result.returncode == 0, result.stderr
    summary = SUMMARY.search(result.stdout)
    assert summary is not None, result.stdout
    expected = (len(samples["accelerometer"]) - WINDOW) // HOP + 1
    assert int(summary.group(1)) == expected and float(summary.group(3)) > 0.5
    with ActivityClient(server.base, trust_env=False) as client:
        state = client.session("replay-csv")
    assert state.started_at == datetime.fromtimestamp(CSV_START, tz=UTC)
    assert state.received == {name: len(rows) for name, rows in samples.items()}


def test_replay_at_ten_times_real_time_paces_its_chunks(server: Server, watch_data: WatchData, tmp_path: Path) -> None:
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    path = tmp_path / "short.csv"
    _write_csv(path, {name: rows[:300] for name, rows in samples.items()}, 50.0, None, start=0.0)  # 6 s
    result = _replay(str(path), "--session", "replay-paced", "--speed", "10", "--url", server.base)
    assert result.returncode == 0, result.stderr
    assert "accuracy: n/a (no labels)" in result.stdout and "windows: 5" in result.stdout
    with ActivityClient(server.base, trust_env=False) as client:
        state = client.session("replay-paced")
    # Without a clock in the file the session starts when the replay does; its last chunk left 6 s / 10 later.
    assert (state.updated_at - state.started_at).total_seconds() >= 0.6


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        ("accelerometer_x,accelerometer_y\n1,2\n", (), "no 'time' column"),
        ("time,accelerometer_x\n0,1\n0.02,oops\n", (), "recording.csv:3: accelerometer_x is 'oops', not a number"),
        ("time,accelerometer_x\n0,1\n0,2\n", (), "recording.csv:3: time does not increase"),
        ("time,accel\n0,1\n0.02,2\n", (), "column 'accel' is not named <modality>_<axis>"),
        (None, ("--speed", "fast"), "neither a positive factor"),
        (None, ("--recording", "3"), "--recording selects a recording of an .npz file"),
        (None, ("--session", "a/b"), "--session 'a/b'"),
    ],
)
def test_replay_refuses_bad_input_in_one_line_with_status_2(
    watch_data: WatchData, tmp_path: Path, content: str | None, options: tuple[str, ...], message: str
) -> None:
    path = tmp_path / "recording.csv"
    if content is None:
        samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
        _write_csv(path, {name: rows[:200] for name, rows in samples.items()}, 50.0, None)
    else:
        path.write_text(content)
    result = _replay(str(path), "--session", "replay-bad", "--url", "http://127.0.0.1:9", *options)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1], result.stderr


def test_replay_refuses_what_the_model_cannot_read(server: Server, watch_data: WatchData, tmp_path: Path) -> None:
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    slow = tmp_path / "slow.csv"
    _write_csv(slow, {name: rows[::2] for name, rows in samples.items()}, 25.0, None)
    no_ids, _ = _held_out_npz(watch_data, tmp_path)
    with np.load(no_ids) as archive:
        content = {key: archive[key] for key in archive.files if key != "recording"}
    np.savez(no_ids, **content)
    taken = tmp_path / "taken.csv"
    _write_csv(taken, {name: rows[:200] for name, rows in samples.items()}, 50.0, None)
    assert _replay(str(taken), "--session", "replay-taken", "--speed", "max", "--url", server.base).returncode == 0
    for path, session, message in [
        (slow, "replay-slow", "accelerometer: sampled at 25 Hz, the model expects 50 Hz"),
        (no_ids, "replay-no-ids", "no 'recording' key"),
        (taken, "replay-taken", "session 'replay-taken' already holds 4 chunks"),
    ]:
        result = _replay(str(path), "--session", session, "--speed", "max", "--url", server.base)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def _on_a_terminal(*args: str, columns: int = 120) -> str:
    """What ``dmft`` writes to a terminal ``columns`` wide (a pseudo-terminal here), carriage returns and all."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen([*dmft_command(), *args], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal's other end closed: the command has exited
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(timeout=120) == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


def test_replay_on_a_terminal_shows_a_progress_bar_and_the_transitions(server: Server) -> None:
    shown = _on_a_terminal("replay", str(EXAMPLE), "--session", "replay-tty", "--speed", "max", "--url", server.base)
    assert "Traceback" not in shown, shown
    lines = [line.strip() for line in shown.splitlines()]  # a bar is redrawn after a carriage return
    # One bar, redrawn in place, of the 30 one-second chunks; windows are counted on it, not listed.
    assert re.search(r"replay-tty: 100%\|.*\| 30/30 \[.*accuracy=0\.9\d+, windows=29\]", shown), shown
    assert not any(line.startswith("window ") for line in lines), shown
    transitions = [line for line in lines if line.startswith("transition  ")]
    assert [line.split("  at ")[0] for line in transitions] == [
        "transition  unknown -> trapezius_extension",
        "transition  trapezius_extension -> upright_row",
    ], shown
    assert SUMMARY.search("\n".join(lines) + "\n"), shown
