"""The tracking benchmark's figures (bench/tracking.py), on a stream small enough to count by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from app.tracker import UNKNOWN

BENCH = Path(__file__).resolve().parent.parent / "bench" / "tracking.py"


@pytest.fixture(scope="module")
def tracking() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tracking_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_the_figures_of_a_stream_with_one_false_flip(tracking: ModuleType) -> None:
    # sit for 10 s, then walk for 10 s; 2 s windows every second: windows 0..18 end at 2..20 s.
    segments = [tracking.Segment("sit", 0.0, 10.0), tracking.Segment("walk", 10.0, 20.0)]
    stream = tracking.Stream("s", 1, {}, 50.0, segments)
    starts = np.arange(19.0)
    # The model is right on every steady window but window 5; window 9 straddles the change.
    predicted = ["sit"] * 9 + ["walk"] * 10
    predicted[5] = "walk"
    probabilities = np.array([[0.9, 0.1] if name == "sit" else [0.1, 0.9] for name in predicted])
    # Tracked: unknown, sit from the second window, a false flip at window 5, walk from window 9 on.
    tracked = [UNKNOWN] + ["sit"] * 4 + ["walk"] + ["sit"] * 3 + ["walk"] * 10
    run = tracking.StreamRun(stream, ["sit", "walk"], starts, starts + 2, probabilities, tracked)

    figures = tracking.score([run], [tracked])

    assert figures["true_changes"] == 2
    # unknown -> sit, sit -> walk (false), walk -> sit, sit -> walk
    assert figures["transitions_per_change"] == 2.0
    # sit reached with the window ending at 3 s (3 s after its start), walk with the one ending at 11 s.
    assert (figures["median_delay_s"], figures["p95_delay_s"]) == (2.0, pytest.approx(2.9))
    assert (figures["within_2s"], figures["within_4s"], figures["reported"]) == (0.5, 1.0, 1.0)
    assert figures["unknown_share"] == pytest.approx(1 / 19)
    # Steady windows: 0..8 inside sit, 10..18 inside walk.
    assert figures["steady_windows"] == 18
    assert figures["model_accuracy"] == pytest.approx(17 / 18)
    assert figures["tracked_accuracy"] == pytest.approx(16 / 18)


def test_a_change_never_reached_counts_as_not_reported(tracking: ModuleType) -> None:
    segments = [tracking.Segment("sit", 0.0, 10.0), tracking.Segment("walk", 10.0, 20.0)]
    starts = np.arange(19.0)
    tracked = [UNKNOWN] + ["sit"] * 18
    run = tracking.StreamRun(
        tracking.Stream("s", 1, {}, 50.0, segments), ["sit", "walk"], starts, starts + 2, np.full((19, 2), 0.5), tracked
    )
    figures = tracking.score([run], [tracked])
    assert (figures["reported"], figures["within_4s"], figures["transitions_per_change"]) == (0.5, 0.5, 0.5)


def test_the_offline_replay_of_the_tracker_gives_its_states_after_each_window(tracking: ModuleType) -> None:
    segments = [tracking.Segment("sit", 0.0, 20.0), tracking.Segment("walk", 20.0, 40.0)]
    starts = np.arange(39.0)
    probabilities = np.array([[0.9, 0.1] if end <= 21 else [0.1, 0.9] for end in starts + 2])
    run = tracking.StreamRun(
        tracking.Stream("s", 1, {}, 50.0, segments), ["sit", "walk"], starts, starts + 2, probabilities, []
    )
    config = tracking.TrackerConfig(delay_seconds=4.0, min_confidence=0.5, window_seconds=2.0, hop_seconds=1.0)
    states = tracking.filter_variant(config)(run)
    assert len(states) == 39 and states[-1] == "walk"
    first_walk = states.index("walk")
    # The first wholly-walk window starts at 20 s; three clear windows later the one ending at 24 s reports it.
    assert run.window_end[first_walk] == 24.0
