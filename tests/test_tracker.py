"""The activity tracker's filter: the delay knob, stray and doubtful windows, event times, segments, state."""

from __future__ import annotations

import json
import logging

import pytest

from app.settings import Settings
from app.tracker import (
    CLEAR_CONFIDENCE,
    UNKNOWN,
    TrackerConfig,
    TrackerState,
    TrackerUpdate,
    WindowLabel,
    advance,
    filter_step,
    tracker_config,
)

CLASSES = ("sit", "walk", "run", "cycle")
WINDOW_SECONDS, HOP_SECONDS = 2.0, 1.0


def window(index: int, activity: str, confidence: float = CLEAR_CONFIDENCE) -> WindowLabel:
    """A window starting at ``index`` seconds, 2 s long, whose top class is ``activity``."""
    rest = (1 - confidence) / (len(CLASSES) - 1)
    probabilities = {name: confidence if name == activity else rest for name in CLASSES}
    return WindowLabel(index, float(index), index + WINDOW_SECONDS, activity, confidence, probabilities, "student")


def labels(*spec: str) -> list[WindowLabel]:
    """``labels("sit", "sit?", ...)``: a trailing ? marks a doubtful window (top class at 0.3)."""
    return [window(i, name.rstrip("?"), 0.3 if name.endswith("?") else CLEAR_CONFIDENCE) for i, name in enumerate(spec)]


def config(delay_seconds: float = 3.0, min_confidence: float = 0.6) -> TrackerConfig:
    return TrackerConfig(delay_seconds, min_confidence, WINDOW_SECONDS, HOP_SECONDS)


def run_tracker(windows: list[WindowLabel], **options: float) -> TrackerUpdate:
    return advance(TrackerState(), windows, config(**options))


def entered(update: TrackerUpdate) -> list[str]:
    return [t.to_activity for t in update.transitions]


@pytest.mark.parametrize("delay_seconds", [3.0, 4.0, 5.0, 7.0])
def test_a_clear_change_is_reported_when_the_window_ending_delay_seconds_after_it_is_in(delay_seconds: float) -> None:
    windows = labels(*["walk"] * 30, *["sit"] * 10)
    update = run_tracker(windows, delay_seconds=delay_seconds)
    assert entered(update) == ["walk", "sit"]
    reported = windows[update.confirmed_at[1]]
    assert reported.end - 30 == delay_seconds  # the change is at 30 s, the first sit window starts there
    # Dated to the first window of the new activity, not to the report.
    assert (update.transitions[1].time, update.transitions[1].window) == (30.0, 30)


def test_stronger_windows_are_reported_sooner() -> None:
    clear = run_tracker([window(i, "walk" if i < 30 else "sit") for i in range(40)], delay_seconds=5.0)
    strong = run_tracker([window(i, "walk" if i < 30 else "sit", 0.999) for i in range(40)], delay_seconds=5.0)
    assert strong.confirmed_at[-1] < clear.confirmed_at[-1]


def test_runs_of_stray_windows_shorter_than_the_delay_do_not_flap() -> None:
    # Two stray windows: a clear change needs three at 5 s (one window plus two hops... plus one).
    spec = ["walk"] * 20 + ["sit"] * 2 + ["walk"] * 10 + ["run"] + ["walk"] * 10
    update = run_tracker(labels(*spec), delay_seconds=5.0)
    assert entered(update) == ["walk"]
    eager = run_tracker(labels(*spec), delay_seconds=3.0)
    assert entered(eager) == ["walk", "sit", "walk"]


def test_a_doubtful_stretch_is_unknown_not_a_flip_flop() -> None:
    spec = ["walk"] * 20 + ["sit?", "run?"] * 6 + ["cycle"] * 10
    update = run_tracker(labels(*spec))
    assert [(t.from_activity, t.to_activity) for t in update.transitions] == [
        (UNKNOWN, "walk"),
        ("walk", UNKNOWN),
        (UNKNOWN, "cycle"),
    ]
    assert update.transitions[1].time == 20.0  # the stretch's first window
    assert update.transitions[1].confidence == pytest.approx(0.3)


def test_min_confidence_decides_what_is_doubtful() -> None:
    spec = ["walk"] * 20 + ["sit?", "run?"] * 6
    assert entered(run_tracker(labels(*spec), min_confidence=0.6)) == ["walk", UNKNOWN]
    assert entered(run_tracker(labels(*spec), min_confidence=0.2)) == ["walk"]


def test_a_session_starts_unknown_and_enters_its_first_activity_like_a_change() -> None:
    update = run_tracker(labels(*["walk"] * 5))
    assert update.transitions[0].from_activity == UNKNOWN
    assert labels(*["walk"] * 5)[update.confirmed_at[0]].end <= 3.0


def test_feeding_windows_in_pieces_equals_feeding_them_at_once() -> None:
    spec = ["walk"] * 6 + ["sit", "walk", "walk", "sit"] + ["sit"] * 5 + ["sit?", "run?"] * 4 + ["run"] * 5
    windows = labels(*spec)
    whole = run_tracker(windows)
    assert len(whole.transitions) >= 3
    state, transitions, segments = TrackerState(), [], []
    for start in range(0, len(windows), 3):
        # Through JSON text, as the store keeps it between chunks.
        stored = TrackerState.from_dict(json.loads(json.dumps(state.to_dict())))
        update = advance(stored, windows[start : start + 3], config())
        state, transitions, segments = update.state, transitions + update.transitions, segments + update.closed_segments
    assert transitions == whole.transitions
    assert segments == whole.closed_segments
    assert state == whole.state


def test_segments_end_where_the_run_of_the_next_activity_starts() -> None:
    update = run_tracker(labels("sit?", *["walk"] * 6, *["sit"] * 4))
    [before, walking] = update.closed_segments
    assert (before.activity, before.start, before.end, before.windows) == (UNKNOWN, 0.0, 1.0, 1)
    assert (walking.activity, walking.start, walking.end, walking.windows) == ("walk", 1.0, 7.0, 6)
    assert walking.mean_confidence == pytest.approx(CLEAR_CONFIDENCE)
    ongoing = update.state.segment
    assert (ongoing.activity, ongoing.start, ongoing.end, ongoing.windows) == ("sit", 7.0, 12.0, 4)


def test_the_state_is_not_modified_in_place() -> None:
    state = TrackerState()
    advance(state, labels("walk", "walk", "walk"), config())
    assert state == TrackerState()


def test_a_state_saved_before_the_filter_goes_on_from_its_activity() -> None:
    saved = {"activity": "walk", "since": 0.0, "confidence": 0.9, "segment": None, "run": None}
    update = advance(TrackerState.from_dict(saved), [window(i, "walk") for i in range(10, 15)], config())
    assert update.transitions == []
    assert update.state.activity == "walk"
    # A change after it takes the same evidence as after a long stay in the activity.
    changed = advance(TrackerState.from_dict(saved), [window(i, "sit") for i in range(10, 20)], config(5.0))
    assert entered(changed) == ["sit"]
    assert changed.confirmed_at == [3]


def test_the_filter_keeps_a_probability_distribution() -> None:
    belief: dict[str, float] = {}
    for evidence in ({"a": 0.9, "b": 0.1, UNKNOWN: 0.15}, {"a": 1e-9, "b": 1.0, UNKNOWN: 0.0}):
        belief = filter_step(belief, evidence, switch=0.01)
        assert sum(belief.values()) == pytest.approx(1.0)
        assert all(value >= 0 for value in belief.values())
    assert max(belief, key=belief.__getitem__) == "b"


def test_the_switch_probability_falls_with_the_delay_and_never_exceeds_a_uniform_jump() -> None:
    states = len(CLASSES) + 1
    probabilities = [config(delay).switch_probability(states) for delay in (0.5, 2.0, 3.0, 4.0, 8.0)]
    assert probabilities == sorted(probabilities, reverse=True)
    assert max(probabilities) == pytest.approx(1 / states)


def test_the_delay_setting_reaches_the_tracker() -> None:
    tracker = tracker_config(Settings(transition_delay_seconds=5.5, hop_seconds=0.5), WINDOW_SECONDS)
    assert (tracker.delay_seconds, tracker.hop_seconds, tracker.window_seconds) == (5.5, 0.5, WINDOW_SECONDS)


def test_the_deprecated_window_count_still_works_as_a_delay(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="app.tracker"):
        tracker = tracker_config(Settings(transition_windows=3), WINDOW_SECONDS)
    assert tracker.delay_seconds == WINDOW_SECONDS + 2 * HOP_SECONDS
    assert "DMFT_TRANSITION_WINDOWS is deprecated" in caplog.text
