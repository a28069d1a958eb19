"""Activity tracking with hysteresis: window predictions in, transitions and segments out.

A single window is noisy, so a session's activity changes only after another label
wins ``required`` consecutive windows. A window's label is its top class when the
model gives it at least ``min_confidence``, else ``unknown``: a run of unconfident
windows is itself a transition, to ``unknown``. The new activity is dated to the
start of the first window of the run that confirmed it.

The tracker also cuts the session into segments (activity, start, end, mean
confidence). A segment ends where the next activity's confirming run starts, so the
windows of that run count towards the new segment, not the old one.

The state is a plain dataclass that round-trips through JSON: the session store keeps
it beside the session and hands it to whichever API process classifies the next
windows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

UNKNOWN = "unknown"


@dataclass(frozen=True)
class WindowLabel:
    """What the tracker needs of one classified window."""

    window: int
    start: float  # epoch seconds
    end: float
    activity: str  # top class
    confidence: float  # its probability
    probabilities: dict[str, float]
    model: str


@dataclass(frozen=True)
class TransitionRecord:
    from_activity: str
    to_activity: str
    time: float  # start of the new activity's first window
    window: int
    confidence: float  # mean over the confirming run
    model: str


@dataclass
class SegmentRecord:
    activity: str
    start: float
    end: float
    confidence_sum: float  # of the probability each window gave ``activity``
    windows: int

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.windows if self.windows else 0.0


@dataclass
class _Run:
    """Consecutive windows whose label differs from the current activity."""

    label: str
    window: int
    start: float
    windows: int = 0
    confidence_sum: float = 0.0  # of the probability each window gave ``label``
    held_sum: float = 0.0  # of the probability each window gave the current activity


@dataclass
class TrackerState:
    activity: str = UNKNOWN
    since: float | None = None
    confidence: float | None = None  # mean confidence of the run that confirmed ``activity``
    segment: SegmentRecord | None = None  # the ongoing one
    run: _Run | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> TrackerState:
        if not data:
            return cls()
        segment, run = data.get("segment"), data.get("run")
        return cls(
            activity=data["activity"],
            since=data["since"],
            confidence=data["confidence"],
            segment=SegmentRecord(**segment) if segment else None,
            run=_Run(**run) if run else None,
        )


@dataclass
class TrackerUpdate:
    state: TrackerState
    transitions: list[TransitionRecord] = field(default_factory=list)
    closed_segments: list[SegmentRecord] = field(default_factory=list)
    # Index into the windows given to ``advance`` after which each transition was confirmed.
    confirmed_at: list[int] = field(default_factory=list)


def _label(window: WindowLabel, min_confidence: float) -> tuple[str, float]:
    """The window's label and the confidence it carries (for ``unknown``: how sure the model was of anything)."""
    if window.confidence >= min_confidence:
        return window.activity, window.confidence
    return UNKNOWN, window.confidence


def _support(window: WindowLabel, activity: str) -> float:
    return window.confidence if activity == UNKNOWN else window.probabilities.get(activity, 0.0)


def advance(state: TrackerState, windows: list[WindowLabel], *, required: int, min_confidence: float) -> TrackerUpdate:
    """Feed ``windows`` (consecutive, oldest first) through the tracker; ``state`` is not modified."""
    state = TrackerState.from_dict(state.to_dict())
    update = TrackerUpdate(state)
    for position, window in enumerate(windows):
        if state.segment is None:
            state.segment = SegmentRecord(state.activity, window.start, window.end, 0.0, 0)
        segment = state.segment
        segment.end = window.end
        segment.windows += 1
        segment.confidence_sum += _support(window, state.activity)

        label, confidence = _label(window, min_confidence)
        if label == state.activity:
            state.run = None
            continue
        if state.run is None or state.run.label != label:
            state.run = _Run(label, window.window, window.start)
        run = state.run
        run.windows += 1
        run.confidence_sum += confidence
        run.held_sum += _support(window, state.activity)
        if run.windows < required:
            continue

        # Confirmed: the run's windows move from the old segment to the new one.
        segment.end = run.start
        segment.windows -= run.windows
        segment.confidence_sum -= run.held_sum
        if segment.windows > 0:
            update.closed_segments.append(segment)
        mean = run.confidence_sum / run.windows
        update.transitions.append(TransitionRecord(state.activity, label, run.start, run.window, mean, window.model))
        update.confirmed_at.append(position)
        state.activity, state.since, state.confidence = label, run.start, mean
        state.segment = SegmentRecord(label, run.start, window.end, run.confidence_sum, run.windows)
        state.run = None
    return update
