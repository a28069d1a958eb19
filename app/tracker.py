"""Activity tracking: window probabilities in, one transition per change of activity out.

The tracker is an online hidden-Markov filter. Its hidden states are the model's classes plus
``unknown``; each window's probabilities are the evidence for the classes, and for ``unknown``
the model's doubt (``1 - top probability``), scaled so that a window whose top class has exactly
``min_confidence`` is a tie between that class and ``unknown``. Between two windows the person
stays in their state, or switches to any other with a small probability: that switching
penalty is what keeps a few stray windows from flipping the tracked activity.

The session enters a state once the filter gives it ``REPORT_POSTERIOR`` of its belief. The
switching penalty comes from one setting a user can reason about, ``delay_seconds``: a change
backed by clear windows (the model gives the new activity ``CLEAR_CONFIDENCE``) is reported
when the window ending that many seconds after the change is in. Stronger windows are reported
sooner, weaker or contradicting ones later or never; a stretch of doubtful windows is reported
as ``unknown`` the same way, instead of flipping between its guesses.

A new activity is dated to the start of the first window of the run of windows (top class,
or ``unknown`` below ``min_confidence``) that led to it. The tracker also cuts the session into
segments (activity, start, end, mean confidence): a segment ends where the next activity's run
starts, so that run's windows count towards the new segment.

The state is a plain dataclass that round-trips through JSON: the session store keeps it
beside the session and hands it to whichever API process classifies the next windows.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from app.settings import Settings

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
# What a "clear" window means for ``delay_seconds``: what a calibrated model says of windows it
# gets right nine times in ten, the rest spread over the other classes.
CLEAR_CONFIDENCE = 0.9
# The share of the filter's belief at which a state is reported. On the validation streams 0.8
# reported as many changes in time as 0.5 with fewer false ones; at 0.9 and above, short delays
# reported nothing, since the shipped models rarely give a window more than 0.92.
REPORT_POSTERIOR = 0.8


@dataclass(frozen=True)
class TrackerConfig:
    delay_seconds: float  # when a clear change is reported, from the change
    min_confidence: float  # below this top probability a window favours ``unknown``
    window_seconds: float
    hop_seconds: float

    def switch_probability(self, states: int) -> float:
        """Probability of moving to one given other state between two windows.

        After a long stay in state A, a clear window multiplies the odds of a new state B against
        A by ``ratio``; B reaches ``REPORT_POSTERIOR`` after ``n`` clear windows when its prior odds
        are ``REPORT_POSTERIOR`` odds divided by ``ratio ** n``. Half a window's evidence of margin
        keeps the crossing off the boundary, so a whole number ``n`` of clear windows reports it
        exactly (a fraction rounds to the nearest).
        """
        classes = states - 1
        ratio = CLEAR_CONFIDENCE * (classes - 1) / (1 - CLEAR_CONFIDENCE)
        windows = 1 + (self.delay_seconds - self.window_seconds) / self.hop_seconds
        odds = REPORT_POSTERIOR / (1 - REPORT_POSTERIOR)
        # Never above a uniform jump: that is already a filter with no memory of the last state.
        return min(1 / states, odds * ratio ** -(windows - 0.5))


def tracker_config(settings: Settings, window_seconds: float) -> TrackerConfig:
    delay = settings.transition_delay_seconds
    if settings.transition_windows is not None:
        # The deprecated count of windows: the first one whole, then one hop per further window.
        delay = window_seconds + (settings.transition_windows - 1) * settings.hop_seconds
        log.warning("DMFT_TRANSITION_WINDOWS is deprecated; it stands for DMFT_TRANSITION_DELAY_SECONDS=%g", delay)
    return TrackerConfig(
        delay_seconds=delay,
        min_confidence=settings.transition_min_confidence,
        window_seconds=window_seconds,
        hop_seconds=settings.hop_seconds,
    )


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
    confidence: float  # mean over the windows of the run that led to it
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
    confidence: float | None = None  # mean confidence of the run that led to ``activity``
    segment: SegmentRecord | None = None  # the ongoing one
    run: _Run | None = None
    belief: dict[str, float] = field(default_factory=dict)  # the filter's posterior; empty before any window

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
            # A state saved before the filter has no belief: it starts sure of the activity it had.
            belief=dict(data["belief"]) if "belief" in data else {data["activity"]: 1.0},
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


def _evidence(window: WindowLabel, min_confidence: float) -> dict[str, float]:
    """How well each state explains the window: its probabilities, and the scaled doubt for ``unknown``."""
    return {**window.probabilities, UNKNOWN: (1 - window.confidence) * min_confidence / (1 - min_confidence)}


def filter_step(belief: dict[str, float], evidence: dict[str, float], switch: float) -> dict[str, float]:
    """One step of the forward filter: predict with the switching probability, weigh by the evidence."""
    if not belief:
        belief = dict.fromkeys(evidence, 1 / len(evidence))
    stay = 1 - switch * len(evidence)
    weighted = {state: (belief.get(state, 0.0) * stay + switch) * evidence[state] for state in evidence}
    total = sum(weighted.values())
    if total <= 0:  # no state explains the window at all: it carries no evidence
        return dict(belief)
    return {state: value / total for state, value in weighted.items()}


def advance(state: TrackerState, windows: list[WindowLabel], config: TrackerConfig) -> TrackerUpdate:
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

        evidence = _evidence(window, config.min_confidence)
        state.belief = filter_step(state.belief, evidence, config.switch_probability(len(evidence)))

        label, confidence = _label(window, config.min_confidence)
        if label == state.activity:
            state.run = None
        else:
            if state.run is None or state.run.label != label:
                state.run = _Run(label, window.window, window.start)
            state.run.windows += 1
            state.run.confidence_sum += confidence
            state.run.held_sum += _support(window, state.activity)

        leader = max(state.belief, key=state.belief.__getitem__)
        if leader == state.activity or state.belief[leader] < REPORT_POSTERIOR:
            continue
        run = state.run
        if run is None or run.label != leader:
            # The filter was persuaded by windows that were not one unbroken run: date it to this window.
            run = _Run(
                leader, window.window, window.start, 1, _support(window, leader), _support(window, state.activity)
            )

        # Reported: the run's windows move from the old segment to the new one.
        segment.end = run.start
        segment.windows -= run.windows
        segment.confidence_sum -= run.held_sum
        if segment.windows > 0:
            update.closed_segments.append(segment)
        mean = run.confidence_sum / run.windows
        update.transitions.append(TransitionRecord(state.activity, leader, run.start, run.window, mean, window.model))
        update.confirmed_at.append(position)
        state.activity, state.since, state.confidence = leader, run.start, mean
        state.segment = SegmentRecord(leader, run.start, window.end, run.confidence_sum, run.windows)
        state.run = None
    return update
