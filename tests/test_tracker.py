"""The activity tracker's hysteresis, unknown state, event times and segments."""

from __future__ import annotations

import pytest

from app.tracker import UNKNOWN, TrackerState, WindowLabel, advance

CLASSES = ("sit", "walk", "run")


def window(index: int, activity: str, confidence: float = 0.9) -> WindowLabel:
    """A window starting at ``index`` seconds, 2 s long, whose top class is ``activity``."""
    rest = (1 - confidence) / (len(CLASSES) - 1)
    probabilities = {name: confidence if name == activity else rest for name in CLASSES}
    return WindowLabel(index, float(index), index + 2.0, activity, confidence, probabilities, "student")


def labels(*spec: str) -> list[WindowLabel]:
    """``labels("sit", "sit?", ...)``: a trailing ? marks an unconfident window."""
    return [window(i, name.rstrip("?"), 0.4 if name.endswith("?") else 0.9) for i, name in enumerate(spec)]


def run_tracker(windows: list[WindowLabel], required: int = 3, min_confidence: float = 0.6):
    return advance(TrackerState(), windows, required=required, min_confidence=min_confidence)


def test_an_activity_is_entered_after_the_required_run_dated_to_its_first_window() -> None:
    update = run_tracker(labels("walk", "walk", "walk", "walk"))
    [transition] = update.transitions
    assert (transition.from_activity, transition.to_activity) == (UNKNOWN, "walk")
    assert (transition.time, transition.window) == (0.0, 0)
    assert transition.confidence == pytest.approx(0.9)
    assert update.confirmed_at == [2]
    assert (update.state.activity, update.state.since) == ("walk", 0.0)


def test_short_runs_do_not_flap() -> None:
    update = run_tracker(labels("walk", "walk", "walk", "sit", "walk", "sit", "sit", "walk", "walk"))
    assert [(t.from_activity, t.to_activity) for t in update.transitions] == [(UNKNOWN, "walk")]
    assert update.state.activity == "walk"


def test_unconfident_windows_lead_to_unknown_and_back() -> None:
    update = run_tracker(labels("sit", "sit", "sit", "sit?", "walk?", "sit?", "run", "run", "run"))
    assert [(t.from_activity, t.to_activity, t.time) for t in update.transitions] == [
        (UNKNOWN, "sit", 0.0),
        ("sit", UNKNOWN, 3.0),
        (UNKNOWN, "run", 6.0),
    ]
    assert update.transitions[1].confidence == pytest.approx(0.4)


def test_required_windows_and_min_confidence_are_configurable() -> None:
    windows = labels("walk", "sit", "sit")
    assert [t.to_activity for t in run_tracker(windows, required=1).transitions] == ["walk", "sit"]
    assert [t.to_activity for t in run_tracker(windows, required=2).transitions] == ["sit"]
    assert run_tracker(windows, required=1, min_confidence=0.95).transitions == []


def test_feeding_windows_in_pieces_equals_feeding_them_at_once() -> None:
    windows = labels("walk", "walk", "sit", "walk", "walk", "walk", "sit", "sit", "sit", "sit?", "run")
    whole = run_tracker(windows)
    state, transitions, segments = TrackerState(), [], []
    for start in range(0, len(windows), 2):
        # Through JSON, as the store keeps it between chunks.
        update = advance(
            TrackerState.from_dict(state.to_dict()), windows[start : start + 2], required=3, min_confidence=0.6
        )
        state, transitions, segments = update.state, transitions + update.transitions, segments + update.closed_segments
    assert transitions == whole.transitions
    assert segments == whole.closed_segments
    assert state == whole.state


def test_segments_end_where_the_confirming_run_starts() -> None:
    update = run_tracker(labels("sit?", "walk", "walk", "walk", "walk", "sit", "sit", "sit"))
    [before, walking] = update.closed_segments
    assert (before.activity, before.start, before.end, before.windows) == (UNKNOWN, 0.0, 1.0, 1)
    assert (walking.activity, walking.start, walking.end, walking.windows) == ("walk", 1.0, 5.0, 4)
    assert walking.mean_confidence == pytest.approx(0.9)
    ongoing = update.state.segment
    assert (ongoing.activity, ongoing.start, ongoing.end, ongoing.windows) == ("sit", 5.0, 9.0, 3)


def test_the_state_is_not_modified_in_place() -> None:
    state = TrackerState()
    advance(state, labels("walk", "walk", "walk"), required=3, min_confidence=0.6)
    assert state == TrackerState()
