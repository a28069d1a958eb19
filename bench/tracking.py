"""Tracking benchmark: continuous streams of held-out subjects through the session service, scored as changes.

A stream is one subject's recordings of different activities joined in random order, each
lasting a random 10 s to 2 min (a recording shorter than its segment is played again from its
start). Each stream is posted to a session in chunks of one hop (1 s), as a gateway would, through the
service (``create_app``: the bundles, a real session store, the tracker), and every answer's
predictions and transitions are kept. A transition is *reported* when the chunk that completes
the window confirming it is answered, so its delay is the end of that window minus the true change.

Scored per true change (every segment's start, the first included): transitions reported per
true change, the share reported into the right activity within 2 s and 4 s, the median and p95
delay of those reported before their segment ends; the share of time tracked as ``unknown``; and
over steady windows (wholly inside one segment) the model's accuracy and the tracked activity's.

The window probabilities the service answered are then replayed offline through tracker
variants (``app.tracker`` is pure: replaying the service's own settings must reproduce its
transitions exactly, which is checked) and through a sweep of the delay knob.

Whatever a variant fits (the delay and minimum confidence, the smoothing constants, a confusion
matrix) is fitted on *validation* streams: the validation subjects carved from the training
subjects, classified by bundles trained without them. ``split`` writes that dataset:

    python bench/tracking.py split --data build/watch.npz --out build/tracking-validation.npz
    OMP_NUM_THREADS=1 dmft fit --data build/tracking-validation.npz --out build/tracking-validation --seed 0
    python bench/tracking.py run --data build/watch.npz \
        --validation-data build/tracking-validation.npz --validation-bundles build/tracking-validation \
        --out bench/results/tracking.json --plot docs/tracking-tradeoff.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.main import create_app  # noqa: E402
from app.replay import load_npz_recording  # noqa: E402
from app.settings import SHIPPED_BUNDLES, Settings  # noqa: E402
from app.tracker import UNKNOWN, TrackerConfig, TrackerState, WindowLabel, advance, tracker_config  # noqa: E402
from model.data import SPLIT_SEED, TEST_FRACTION, load_npz, save_npz, train_test_split  # noqa: E402
from tools.stack import redis_prefix  # noqa: E402

log = logging.getLogger("tracking")

MIN_SEGMENT_SECONDS, MAX_SEGMENT_SECONDS = 10.0, 120.0
CAUGHT_WITHIN = (2.0, 4.0)  # seconds from a true change to its report


@dataclass
class Segment:
    activity: str
    start: float  # seconds from the stream's first sample
    end: float


@dataclass
class Stream:
    name: str
    subject: int
    samples: dict[str, np.ndarray]  # modality -> (L, C)
    rate: float  # samples per second (every modality of the watch data has one rate)
    segments: list[Segment]


@dataclass
class StreamRun:
    """What the service answered for one stream."""

    stream: Stream
    class_names: list[str]
    window_start: np.ndarray  # (W,) seconds
    window_end: np.ndarray  # (W,)
    probabilities: np.ndarray  # (W, K)
    tracked: list[str]  # the session's activity after each window, from the transitions it reported


def load_subject_recordings(path: Path, subjects: list[int]) -> dict[int, dict[str, list]]:
    """subject -> activity -> continuous recordings of it (``app.replay`` stitches them from the windows)."""
    with np.load(path, allow_pickle=False) as archive:
        ids, owners = archive["recording"], archive["subject"]
    recordings: dict[int, dict[str, list]] = {subject: {} for subject in subjects}
    for recording in np.unique(ids[np.isin(owners, subjects)]):
        subject = int(owners[np.flatnonzero(ids == recording)[0]])
        loaded = load_npz_recording(path, int(recording))
        activity = str(loaded.labels[0])
        recordings[subject].setdefault(activity, []).append(loaded)
    return recordings


def build_streams(path: Path, *, count: int, segments: int, seed: int) -> list[Stream]:
    """``count`` streams of ``segments`` segments each, over the file's held-out subjects in turn."""
    subjects = train_test_split(load_npz(path)).held_out_subjects
    if not subjects:
        raise SystemExit(f"{path}: no subject-held-out split (the file needs 'subject' ids)")
    recordings = load_subject_recordings(path, subjects)
    rng = np.random.default_rng(seed)
    streams = []
    for index in range(count):
        subject = subjects[index % len(subjects)]
        by_activity = recordings[subject]
        pieces: dict[str, list[np.ndarray]] = {}
        stream_segments: list[Segment] = []
        position, previous, rate = 0, None, 0.0
        for _ in range(segments):
            activity = str(rng.choice(sorted(set(by_activity) - {previous})))
            recording = by_activity[activity][rng.integers(len(by_activity[activity]))]
            rate = recording.rates[next(iter(recording.samples))]
            length = round(rng.uniform(MIN_SEGMENT_SECONDS, MAX_SEGMENT_SECONDS) * rate)
            offset = int(rng.integers(len(recording.labels)))
            take = (offset + np.arange(length)) % len(recording.labels)  # played again from the start if short
            for name, samples in recording.samples.items():
                pieces.setdefault(name, []).append(samples[take])
            stream_segments.append(Segment(activity, position / rate, (position + length) / rate))
            position, previous = position + length, activity
        samples = {name: np.concatenate(parts) for name, parts in pieces.items()}
        streams.append(Stream(f"stream-{seed}-{index}", subject, samples, rate, stream_segments))
    return streams


def run_through_service(streams: list[Stream], settings: Settings) -> list[StreamRun]:
    """Each stream in chunks of one hop, so that each answer brings at most one new window."""
    runs = []
    with TestClient(create_app(settings)) as client:
        for stream in streams:
            runs.append(_post_stream(client, stream, settings.hop_seconds))
            log.info("%s: %d windows", stream.name, len(runs[-1].tracked))
    return runs


def _post_stream(client: TestClient, stream: Stream, chunk_seconds: float) -> StreamRun:
    step = round(chunk_seconds * stream.rate)
    total = len(next(iter(stream.samples.values())))
    starts, ends, probabilities, tracked = [], [], [], []
    activity, class_names = UNKNOWN, None
    for seq, offset in enumerate(range(0, total, step)):
        chunk = {name: samples[offset : offset + step].tolist() for name, samples in stream.samples.items()}
        response = client.post(f"/v1/sessions/{stream.name}/samples", json={"seq": seq, "modalities": chunk})
        response.raise_for_status()
        answer = response.json()
        for prediction in answer["predictions"]:
            class_names = class_names or list(prediction["probabilities"])
            starts.append(prediction["start_seconds"])
            ends.append(prediction["end_seconds"])
            probabilities.append([prediction["probabilities"][name] for name in class_names])
            tracked.append(activity)
        # The transitions are reported with this answer: after its last window, in order.
        for transition in answer["transitions"]:
            activity = transition["to"]
        if tracked:
            tracked[-1] = activity
    client.delete(f"/v1/sessions/{stream.name}")
    return StreamRun(stream, class_names or [], np.array(starts), np.array(ends), np.array(probabilities), tracked)


def score(runs: list[StreamRun], tracked: list[list[str]]) -> dict[str, Any]:
    """The tracking figures of ``tracked`` (the activity after each window, per run)."""
    changes = transitions = unknown = windows = steady = steady_model = steady_tracked = 0
    delays: list[float] = []
    for run, states in zip(runs, tracked, strict=True):
        ends = run.window_end
        states = np.array(states)
        changes += len(run.stream.segments)
        transitions += int(np.sum(states[1:] != states[:-1])) + int(states[0] != UNKNOWN)
        unknown += int(np.sum(states == UNKNOWN))
        windows += len(states)
        for segment in run.stream.segments:
            # The first report after the change that has the session in the new activity.
            reached = np.flatnonzero((ends > segment.start) & (ends <= segment.end) & (states == segment.activity))
            if len(reached):
                delays.append(float(ends[reached[0]] - segment.start))
        predicted = np.array(run.class_names)[run.probabilities.argmax(axis=1)]
        for segment in run.stream.segments:
            inside = (run.window_start >= segment.start) & (ends <= segment.end)
            steady += int(inside.sum())
            steady_model += int(np.sum(predicted[inside] == segment.activity))
            steady_tracked += int(np.sum(states[inside] == segment.activity))
    delay = np.array(delays)
    return {
        "true_changes": changes,
        "transitions_per_change": transitions / changes,
        **{f"within_{seconds:g}s": float(np.sum(delay <= seconds) / changes) for seconds in CAUGHT_WITHIN},
        "reported": len(delays) / changes,
        "median_delay_s": float(np.median(delay)) if len(delay) else None,
        "p95_delay_s": float(np.percentile(delay, 95)) if len(delay) else None,
        "unknown_share": unknown / windows,
        "steady_windows": steady,
        "model_accuracy": steady_model / steady,
        "tracked_accuracy": steady_tracked / steady,
    }


# A variant maps one run's window probabilities to the activity tracked after each window.
Variant = Callable[[StreamRun], list[str]]

DELAYS = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0)  # swept for the trade-off curve and the tuning
MIN_CONFIDENCES = (0.4, 0.5, 0.6)
SMOOTHING = [(alpha, threshold) for alpha in (0.3, 0.5, 0.7) for threshold in (0.5, 0.6, 0.7, 0.8)]


def _windows(run: StreamRun, probabilities: np.ndarray | None = None) -> list[WindowLabel]:
    probabilities = run.probabilities if probabilities is None else probabilities
    labels = []
    for index, (start, end, row) in enumerate(zip(run.window_start, run.window_end, probabilities, strict=True)):
        best = int(row.argmax())
        named = {name: float(p) for name, p in zip(run.class_names, row, strict=True)}
        labels.append(WindowLabel(index, start, end, run.class_names[best], float(row[best]), named, "replay"))
    return labels


def filter_variant(config: TrackerConfig, confusion: np.ndarray | None = None) -> Variant:
    """``app.tracker`` itself, window by window; with ``confusion`` (rows: true class, columns: predicted
    class) each window's probabilities are first turned into how likely each true class makes them."""

    def track(run: StreamRun) -> list[str]:
        probabilities = run.probabilities
        if confusion is not None:
            likelihood = probabilities @ confusion.T
            probabilities = likelihood / likelihood.sum(axis=1, keepdims=True)
        update = advance(TrackerState(), _windows(run, probabilities), config)
        return _states(len(probabilities), update.confirmed_at, [t.to_activity for t in update.transitions])

    return track


def _states(windows: int, confirmed_at: list[int], entered: list[str]) -> list[str]:
    states, activity, pending = [], UNKNOWN, dict(zip(confirmed_at, entered, strict=True))
    for index in range(windows):
        activity = pending.get(index, activity)
        states.append(activity)
    return states


def voting_variant(required: int, min_confidence: float) -> Variant:
    """The tracker before the filter: a label (top class, or unknown below ``min_confidence``) is entered
    after it wins ``required`` consecutive windows."""

    def track(run: StreamRun) -> list[str]:
        activity, candidate, count, states = UNKNOWN, None, 0, []
        for row in run.probabilities:
            best = int(row.argmax())
            label = run.class_names[best] if row[best] >= min_confidence else UNKNOWN
            if label == activity:
                candidate, count = None, 0
            else:
                count = count + 1 if label == candidate else 1
                candidate = label
                if count >= required:
                    activity, candidate, count = label, None, 0
            states.append(activity)
        return states

    return track


def smoothing_variant(alpha: float, threshold: float) -> Variant:
    """Exponential averaging of the probabilities; a class is entered once its average reaches ``threshold``."""

    def track(run: StreamRun) -> list[str]:
        average, activity, states = None, UNKNOWN, []
        for row in run.probabilities:
            average = row if average is None else (1 - alpha) * average + alpha * row
            best = int(average.argmax())
            if average[best] >= threshold:
                activity = run.class_names[best]
            states.append(activity)
        return states

    return track


def cost(figures: dict[str, Any]) -> float:
    """What the tuning minimises: a false transition costs as much as a change not reported within 4 s."""
    return (figures["transitions_per_change"] - figures["reported"]) + (1 - figures["within_4s"])


def evaluate(runs: list[StreamRun], variant: Variant) -> dict[str, Any]:
    return score(runs, [variant(run) for run in runs])


def steady_confusion(runs: list[StreamRun]) -> np.ndarray:
    """Rows: true class, columns: the model's top class, over steady windows (add-one smoothed, rows sum to 1)."""
    classes = runs[0].class_names
    counts = np.ones((len(classes), len(classes)))
    for run in runs:
        predicted = run.probabilities.argmax(axis=1)
        for segment in run.stream.segments:
            inside = (run.window_start >= segment.start) & (run.window_end <= segment.end)
            np.add.at(counts[classes.index(segment.activity)], predicted[inside], 1)
    return counts / counts.sum(axis=1, keepdims=True)


@dataclass
class Tuned:
    delay_seconds: float
    min_confidence: float
    smoothing: tuple[float, float]
    confusion: np.ndarray | None


def least_cost(runs: list[StreamRun], candidates: dict[Any, Variant]) -> Any:
    """The candidate of least ``cost`` among those whose tracked accuracy is at least the model's."""
    figures = {key: evaluate(runs, variant) for key, variant in candidates.items()}
    allowed = [key for key, f in figures.items() if f["tracked_accuracy"] >= f["model_accuracy"]] or list(figures)
    return min(allowed, key=lambda key: cost(figures[key]))


def tune(runs: list[StreamRun], base: TrackerConfig) -> Tuned:
    """The least-cost setting of each fitted variant on validation runs."""
    grid = [replace(base, delay_seconds=d, min_confidence=c) for d in DELAYS for c in MIN_CONFIDENCES]
    filtered = least_cost(runs, {config: filter_variant(config) for config in grid})
    smoothing = least_cost(runs, {pair: smoothing_variant(*pair) for pair in SMOOTHING})
    log.info(
        "validation: delay %g s, min confidence %g; smoothing %s",
        filtered.delay_seconds,
        filtered.min_confidence,
        smoothing,
    )
    return Tuned(filtered.delay_seconds, filtered.min_confidence, smoothing, steady_confusion(runs))


def variants(config: TrackerConfig, tuned: Tuned | None) -> dict[str, Variant]:
    """The variants beside the service's own tracker (which the service row shows)."""
    found: dict[str, Variant] = {
        "voting, 3 windows at 0.6 (the tracker before)": voting_variant(3, 0.6),
        "voting, 2 windows at 0.6": voting_variant(2, 0.6),
    }
    if tuned is not None:
        alpha, threshold = tuned.smoothing
        fitted = replace(config, delay_seconds=tuned.delay_seconds, min_confidence=tuned.min_confidence)
        found[f"smoothing, alpha {alpha:g}, enter at {threshold:g} (fitted)"] = smoothing_variant(alpha, threshold)
        if fitted != config:
            found[f"filter, {fitted.delay_seconds:g} s, {fitted.min_confidence:g} (fitted)"] = filter_variant(fitted)
        found[f"filter + validation confusion, {fitted.delay_seconds:g} s (fitted)"] = filter_variant(
            fitted, tuned.confusion
        )
    return found


def sweep(runs: list[StreamRun], config: TrackerConfig) -> list[dict[str, Any]]:
    return [
        {"delay_seconds": delay, **evaluate(runs, filter_variant(replace(config, delay_seconds=delay)))}
        for delay in DELAYS
    ]


def check_replay(runs: list[StreamRun], config: TrackerConfig) -> None:
    """The service's transitions are those of ``app.tracker`` fed the same probabilities."""
    replay = filter_variant(config)
    for run in runs:
        if replay(run) != run.tracked:
            raise SystemExit(f"{run.stream.name}: the offline tracker disagrees with the service")


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| tracker | transitions per change | within 2 s | within 4 s | median delay s | p95 delay s "
        "| unknown | tracked accuracy | model accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in rows.items():
        lines.append(
            f"| {name} | {f['transitions_per_change']:.2f} | {f['within_2s']:.1%} | {f['within_4s']:.1%} "
            f"| {f['median_delay_s']:.1f} | {f['p95_delay_s']:.1f} | {f['unknown_share']:.1%} "
            f"| {f['tracked_accuracy']:.1%} | {f['model_accuracy']:.1%} |"
        )
    return "\n".join(lines).replace("%", " %")


def plot(curve: list[dict[str, Any]], rows: dict[str, dict[str, Any]], default: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    delays = [point["delay_seconds"] for point in curve]
    left.plot(delays, [p["transitions_per_change"] for p in curve], "o-", color="tab:red")
    left.set_xlabel("DMFT_TRANSITION_DELAY_SECONDS")
    left.set_ylabel("transitions reported per true change", color="tab:red")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.axvline(default, color="grey", linestyle=":", linewidth=0.8)
    left.annotate("default", (default, left.get_ylim()[1]), ha="center", va="top", fontsize=8)
    share = left.twinx()
    share.plot(delays, [p["within_4s"] for p in curve], "s--", color="tab:blue", label="within 4 s")
    share.plot(delays, [p["within_2s"] for p in curve], "^:", color="tab:blue", label="within 2 s")
    share.set_ylabel("true changes reported in time", color="tab:blue")
    share.set_ylim(0, 1.02)
    share.legend(loc="center right")
    left.set_title("the delay knob (held-out subjects)")

    for point in curve:
        right.annotate(f"{point['delay_seconds']:g} s", (point["median_delay_s"], point["transitions_per_change"]))
    right.plot(
        [p["median_delay_s"] for p in curve],
        [p["transitions_per_change"] for p in curve],
        "o-",
        color="tab:red",
        label="filter, swept delay",
    )
    for name, figures in rows.items():
        if not name.startswith(("filter,", "filter in")):
            right.plot(figures["median_delay_s"], figures["transitions_per_change"], "x", markersize=9, label=name)
    right.set_xlabel("median delay from a true change to its report, s")
    right.set_ylabel("transitions reported per true change")
    right.legend(fontsize=7)
    right.set_title("false transitions against delay")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def stream_runs(data: Path, bundles: Path, args: argparse.Namespace) -> list[StreamRun]:
    streams = build_streams(data, count=args.streams, segments=args.segments, seed=args.seed)
    settings = Settings(bundles=bundles, redis_url=args.redis_url or None)
    if not settings.redis_url:
        return run_through_service(streams, settings)
    with redis_prefix(settings.redis_url, "dmft-tracking") as prefix:
        return run_through_service(streams, settings.model_copy(update={"redis_prefix": prefix}))


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    runs = stream_runs(args.data, args.bundles, args)
    log.info("streamed %d windows in %.0f s", sum(len(run.tracked) for run in runs), time.perf_counter() - started)
    settings = Settings()
    config = tracker_config(settings, float(runs[0].window_end[0] - runs[0].window_start[0]))
    check_replay(runs, config)
    tuned = None
    if args.validation_data:
        tuned = tune(stream_runs(args.validation_data, args.validation_bundles, args), config)
    rows = {name: evaluate(runs, variant) for name, variant in variants(config, tuned).items()}
    service = f"filter in the service ({config.delay_seconds:g} s, {config.min_confidence:g})"
    rows = {service: score(runs, [run.tracked for run in runs]), **rows}
    curve = sweep(runs, config)
    print(table(rows))
    print()
    print(table({f"filter, {point['delay_seconds']:g} s": point for point in curve}))
    errors = model_errors(runs)
    print()
    print("model errors on steady windows:", json.dumps(errors))
    if args.out:
        result = {
            "rows": rows,
            "curve": curve,
            "model_errors": errors,
            "tuned": None
            if tuned is None
            else {
                "delay_seconds": tuned.delay_seconds,
                "min_confidence": tuned.min_confidence,
                "smoothing": tuned.smoothing,
            },
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(curve, rows, config.delay_seconds, args.plot)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    """The training subjects only, with a predefined split whose test part is the validation subjects."""
    dataset = load_npz(args.data)
    split = train_test_split(dataset)
    subjects = np.unique(dataset.subject[split.train])
    rng = np.random.default_rng(SPLIT_SEED)
    validation = np.sort(rng.permutation(subjects)[: max(1, round(TEST_FRACTION * len(subjects)))])
    training = dataset.subset(split.train)
    training.split = np.where(np.isin(training.subject, validation), "test", "train")
    with np.load(args.data, allow_pickle=False) as archive:
        recording = archive["recording"][split.train]
    save_npz(args.out, training, recording=recording)
    log.info(
        "validation subjects %s of the training subjects %s -> %s", validation.tolist(), subjects.tolist(), args.out
    )
    return 0


def model_errors(runs: list[StreamRun]) -> dict[str, Any]:
    """How the model's wrong steady windows come: runs of consecutive ones by length, and the commonest
    confusions (true -> predicted) with their share of the wrong windows."""
    lengths: dict[str, int] = {}
    confusions: dict[str, int] = {}
    for run in runs:
        predicted = np.array(run.class_names)[run.probabilities.argmax(axis=1)]
        for segment in run.stream.segments:
            inside = (run.window_start >= segment.start) & (run.window_end <= segment.end)
            wrong = predicted[inside] != segment.activity
            for name in predicted[inside][wrong]:
                key = f"{segment.activity} -> {name}"
                confusions[key] = confusions.get(key, 0) + 1
            # Starts and ends of the runs of wrong windows.
            edges = np.flatnonzero(np.diff(np.concatenate([[0], wrong.astype(int), [0]])))
            for length in edges[1::2] - edges[::2]:
                key = str(length) if length < 4 else "4+"
                lengths[key] = lengths.get(key, 0) + 1
    total = sum(confusions.values())
    commonest = sorted(confusions.items(), key=lambda item: -item[1])[:6]
    return {
        "wrong_run_lengths": dict(sorted(lengths.items())),
        "commonest_confusions": {key: round(count / total, 3) for key, count in commonest},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="write the validation dataset (training subjects only)")
    split.add_argument("--data", type=Path, required=True)
    split.add_argument("--out", type=Path, required=True)
    split.set_defaults(handler=cmd_split)

    run = commands.add_parser("run", help="stream, score and compare the trackers")
    run.add_argument("--data", type=Path, required=True, help=".npz with 'subject' and 'recording' ids")
    run.add_argument("--bundles", type=Path, default=SHIPPED_BUNDLES, help="never trained on the held-out subjects")
    run.add_argument("--validation-data", type=Path, help="written by 'split'; fitted variants need it")
    run.add_argument("--validation-bundles", type=Path, help="trained on --validation-data by 'dmft fit'")
    run.add_argument("--streams", type=int, default=18)
    run.add_argument("--segments", type=int, default=15, help="segments per stream")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="'' keeps sessions in the process")
    run.add_argument("--out", type=Path, help="write the figures as JSON")
    run.add_argument("--plot", type=Path, help="write the trade-off curve as PNG")
    run.set_defaults(handler=cmd_run)
    args = parser.parse_args()
    if getattr(args, "validation_data", None) and not args.validation_bundles:
        parser.error("--validation-data needs --validation-bundles")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("httpx", "httpx2"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
