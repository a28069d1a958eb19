"""Real traffic for a running service, built from the watch recordings of subjects that training never saw.

The watch dataset is built from the recordings shipped in ``seglearn`` (2 s windows at 50 Hz,
hop 1 s) and split by held-out subjects exactly as training splits it (``load_watch_data``;
the HTTP tests read the same data). ``Traffic`` drives a service with it, as both README
pictures need (``tools.record_dashboard``, ``tools.capture_dashboard``):

- wrist gateways, one thread each, stream a playlist of held-out recordings of changing
  activities into their session, one second of samples a second; the first chunk may carry
  some of the past at once, dated that far back, so a session looks as if it had run a
  while. When a playlist ends, so does its session, and the gateway starts another a few
  seconds later, so the number of active sessions moves;
- clients post held-out windows to the student, the teacher and the cascade: single
  windows, batches, windows with a sensor missing, now and then a malformed one.

Every answer is checked: anything but a success, or the 409 or 422 that the traffic provoked
on purpose, fails its thread, and ``Traffic`` reports that rather than taking a picture of a
broken run.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from model.data import WindowDataset, train_test_split
from model.watch import CHANNELS, build_watch_dataset, load_recordings

log = logging.getLogger(__name__)

MODALITIES = tuple(CHANNELS)  # ("accelerometer", "gyroscope")
SAMPLE_RATE = 50  # Hz of the watch recordings: one second of samples per chunk
RECONNECT_S = (2.0, 6.0)  # how long a gateway whose playlist ended waits before its next session
STALE_AFTER, STALE_SEQ = 5, 2  # a stale gateway resends chunk 2 once it has sent chunk 5

Rows = list[list[float]]
Samples = dict[str, np.ndarray]


@dataclass(frozen=True)
class WatchData:
    dataset: WindowDataset
    recording: np.ndarray  # recording index of each window
    test: np.ndarray  # indices of the held-out windows
    held_out_subjects: list[int]
    raw: dict[str, Any]  # seglearn's recordings: X (list of (L, 6)), y, subject, y_labels

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    def window(self, index: int, modalities: tuple[str, ...] = MODALITIES) -> dict[str, Rows]:
        """Window ``index`` of the dataset as the JSON rows of a request."""
        return {name: self.dataset.arrays[name][index].tolist() for name in modalities}

    def held_out_recordings(self) -> list[int]:
        """Recordings of the held-out subjects, shortest first."""
        subjects = np.asarray(self.raw["subject"])
        chosen = [i for i in range(len(self.raw["X"])) if int(subjects[i]) in self.held_out_subjects]
        return sorted(chosen, key=lambda i: len(self.raw["X"][i]))

    def recording_samples(self, index: int) -> Samples:
        """The raw samples of one recording, per modality: ``(L, 3)`` float64."""
        series = np.asarray(self.raw["X"][index], dtype=np.float64)
        return {name: series[:, channels] for name, channels in CHANNELS.items()}

    def recording_label(self, index: int) -> str:
        return self.class_names[int(self.raw["y"][index])]


def load_watch_data() -> WatchData:
    """The watch dataset split as training splits it, with the raw recordings behind its windows."""
    dataset, recording = build_watch_dataset()
    split = train_test_split(dataset)
    return WatchData(
        dataset=dataset,
        recording=recording,
        test=split.test,
        held_out_subjects=split.held_out_subjects,
        raw=load_recordings(),
    )


def playlist(watch: WatchData, rng: random.Random, *, first_class: int, seconds: float) -> Samples:
    """Held-out recordings one after another, ``seconds`` long at least (one recording for 0).

    The first is of ``first_class``, and each of another activity than the one before, so the
    tracked activity changes where one recording gives way to the next.
    """
    recordings = watch.held_out_recordings()
    labels = {index: int(watch.raw["y"][index]) for index in recordings}
    chosen = [rng.choice([index for index in recordings if labels[index] == first_class])]
    while sum(len(watch.raw["X"][index]) for index in chosen) < seconds * SAMPLE_RATE:
        chosen.append(rng.choice([index for index in recordings if labels[index] != labels[chosen[-1]]]))
    parts = [watch.recording_samples(index) for index in chosen]
    return {name: np.concatenate([part[name] for part in parts]) for name in MODALITIES}


@dataclass(frozen=True)
class Sessions:
    """Wrist gateways, one per session id, streaming playlists in real time."""

    backfill_s: Mapping[str, float]  # session id -> seconds of its past that its first chunk carries (0: none)
    playlist_s: float = 0.0  # a playlist lasts this long besides its backfill (0: one recording)
    stagger_s: float = 0.0  # the n-th gateway starts n times this late, so the active sessions rise one by one
    stale_chunk: bool = False  # each session resends an old chunk out of order, as a confused client would: a 409


@dataclass(frozen=True)
class Posters:
    """Clients posting held-out windows to the predict endpoints, one thread and connection each."""

    clients: int
    models: tuple[str, ...]  # drawn for each request: a name given twice is asked twice as often
    pause_s: float = 0.05  # between one client's requests (0: back to back)
    batch_share: float = 0.0  # of the requests that are a batch of ``batch_size`` windows
    batch_size: int = 16
    malformed_share: float = 0.0  # of the requests with two accelerometer channels where it has three: a 422
    missing_share: float = 0.0  # of the single windows with the accelerometer alone, as if the gyroscope dropped out


class Traffic:
    """The gateways of ``sessions`` and the clients of ``posters`` against ``base``, for as long as the block runs.

    Leaving the block stops and joins every thread, then raises if one failed; ``check``
    raises at once, before a result is taken from a run that went wrong.
    """

    def __init__(
        self,
        base: str,
        watch: WatchData,
        *,
        sessions: Sessions | None = None,
        posters: Posters | None = None,
        seed: int = 0,
    ) -> None:
        self.base = base
        self.watch = watch
        self.sessions = sessions
        self.posters = posters
        self._rng = random.Random(seed)
        self._test = [int(index) for index in watch.test]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failures: list[str] = []

    def __enter__(self) -> Traffic:
        if self.sessions is not None:
            classes = len(self.watch.class_names)
            # Sessions start on different activities, so that the page and the panels show several at once.
            order = self._rng.sample(range(classes), classes)
            for number, (session_id, backfill_s) in enumerate(self.sessions.backfill_s.items()):
                delay_s = number * self.sessions.stagger_s
                self._start(self._gateway, self.sessions, session_id, order[number % classes], backfill_s, delay_s)
        if self.posters is not None:
            for _ in range(self.posters.clients):
                self._start(self._post_windows, self.posters)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if kind is None:
            self.check()

    def check(self) -> None:
        """Raise if a thread has failed (its traceback is logged)."""
        if self._failures:
            raise RuntimeError(f"the traffic failed: {'; '.join(self._failures)}")

    def _start(self, work: Callable[..., None], *args: Any) -> None:
        """``work(client, rng, *args)`` in a thread of its own, on its own connection and random stream."""
        rng = random.Random(self._rng.random())

        def run() -> None:
            try:
                with httpx.Client(base_url=self.base, timeout=30, trust_env=False) as client:
                    work(client, rng, *args)
            except Exception as error:
                log.exception("a traffic thread failed")
                self._failures.append(f"{type(error).__name__}: {error}")

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _gateway(
        self,
        client: httpx.Client,
        rng: random.Random,
        plan: Sessions,
        session_id: str,
        first_class: int,
        backfill_s: float,
        delay_s: float,
    ) -> None:
        """Playlists into ``session_id`` one after another, the session ended between them, until stopped."""
        if self._stop.wait(delay_s):
            return
        while True:
            samples = playlist(self.watch, rng, first_class=first_class, seconds=backfill_s + plan.playlist_s)
            if not self._play(client, session_id, samples, backfill_s=backfill_s, stale_chunk=plan.stale_chunk):
                return
            _request(client, "DELETE", f"/v1/sessions/{session_id}")
            if self._stop.wait(rng.uniform(*RECONNECT_S)):
                return
            # The next session begins now, on any activity.
            first_class, backfill_s = rng.randrange(len(self.watch.class_names)), 0.0

    def _play(
        self, client: httpx.Client, session_id: str, samples: Samples, *, backfill_s: float, stale_chunk: bool
    ) -> bool:
        """Stream ``samples`` into the session; False if stopped first.

        The first ``backfill_s`` seconds go at once, dated that far back; then one second a
        second by the clock, not after each answer, so that a slow answer does not slow the stream.
        """
        path = f"/v1/sessions/{session_id}/samples"
        length = len(samples[MODALITIES[0]])
        ends = [*range(max(round(backfill_s * SAMPLE_RATE), SAMPLE_RATE), length, SAMPLE_RATE), length]
        started, start = time.monotonic(), 0
        for seq, end in enumerate(ends):
            if seq and self._stop.wait(max(0.0, started + seq - time.monotonic())):
                return False
            chunk = {name: rows[start:end].tolist() for name, rows in samples.items()}
            body: dict[str, Any] = {"seq": seq, "modalities": chunk}
            if seq == 0 and backfill_s:
                body["timestamp"] = (datetime.now(UTC) - timedelta(seconds=backfill_s)).isoformat()
            _request(client, "POST", path, body)
            if stale_chunk and seq == STALE_AFTER:
                _request(client, "POST", path, {"seq": STALE_SEQ, "modalities": chunk}, expect=409)
            start = end
        return not self._stop.is_set()

    def _post_windows(self, client: httpx.Client, rng: random.Random, plan: Posters) -> None:
        """Requests drawn as ``plan`` says, until stopped."""
        while not self._stop.wait(plan.pause_s):
            model = rng.choice(plan.models)
            draw = rng.random()
            if draw < plan.batch_share:
                indices = rng.sample(self._test, plan.batch_size)
                windows = [{"modalities": self.watch.window(index)} for index in indices]
                _request(client, "POST", "/v1/predict/batch", {"windows": windows, "model": model})
            elif draw < plan.batch_share + plan.malformed_share:
                accelerometer = self.watch.window(rng.choice(self._test), ("accelerometer",))["accelerometer"]
                body = {"modalities": {"accelerometer": [row[:2] for row in accelerometer]}}
                _request(client, "POST", "/v1/predict", body, expect=422)
            else:
                modalities = ("accelerometer",) if draw > 1 - plan.missing_share else MODALITIES
                window = self.watch.window(rng.choice(self._test), modalities)
                _request(client, "POST", "/v1/predict", {"modalities": window, "model": model})


def _request(
    client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None, *, expect: int | None = None
) -> None:
    """One request whose answer must be ``expect``, or a success where none is named."""
    response = client.request(method, path, json=body)
    if not (response.is_success if expect is None else response.status_code == expect):
        raise RuntimeError(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
