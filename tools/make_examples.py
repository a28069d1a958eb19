"""Write ``examples/``: real sensor data for the README's walk-through, which needs no extra to run.

- ``window.json``: one two-second window of a held-out subject, as ``POST /v1/predict`` takes it;
- ``recording.csv``: two held-out recordings of different exercises one after the other, in
  the CSV that ``dmft replay`` reads (``time`` in seconds, ``<modality>_<axis>``, ``label``).

Both come from subjects that training never saw (the subject split of ``dmft fit``), and
are chosen so that the shipped student recognises them: the walk-through's answers then
show a confident activity and a transition. Needs the ``train`` extra (seglearn's recordings)::

    python -m tools.make_examples --out examples
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from model.bundle import Bundle, load_bundle
from tools.traffic import MODALITIES, SAMPLE_RATE, WatchData, load_watch_data

WEIGHTS = Path(__file__).resolve().parents[1] / "model" / "weights"
PART_SECONDS = 15  # of each recording in the CSV: long enough for the tracked activity to change
DECIMALS = 5


def recognised(bundle: Bundle, watch: WatchData, index: int) -> bool:
    """Whether the student labels every window of the recording's first part as the recording is labelled."""
    samples = watch.recording_samples(index)
    window = bundle.window_samples[MODALITIES[0]]
    starts = range(0, PART_SECONDS * SAMPLE_RATE - window + 1, SAMPLE_RATE)
    batch = {name: np.stack([samples[name][s : s + window] for s in starts]).astype(np.float32) for name in MODALITIES}
    predicted = bundle.predict(batch).argmax(axis=1)
    return bool((predicted == bundle.class_names.index(watch.recording_label(index))).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples"), help="folder to write to")
    args = parser.parse_args()
    watch = load_watch_data()
    student = load_bundle(WEIGHTS / "student")
    long_enough = [i for i in watch.held_out_recordings() if len(watch.raw["X"][i]) >= PART_SECONDS * SAMPLE_RATE]
    chosen = [i for i in long_enough if recognised(student, watch, i)]
    first = chosen[0]
    second = next(i for i in chosen if watch.recording_label(i) != watch.recording_label(first))
    args.out.mkdir(parents=True, exist_ok=True)

    window = student.window_samples[MODALITIES[0]]
    samples = watch.recording_samples(first)
    body = {"modalities": {name: np.round(samples[name][:window], DECIMALS).tolist() for name in MODALITIES}}
    (args.out / "window.json").write_text(json.dumps(body) + "\n")

    with (args.out / "recording.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["time", *(f"{name}_{axis}" for name in MODALITIES for axis in "xyz"), "label"])
        row = 0
        for index in (first, second):
            samples = watch.recording_samples(index)
            for k in range(PART_SECONDS * SAMPLE_RATE):
                values = [f"{v:.{DECIMALS}f}" for name in MODALITIES for v in samples[name][k]]
                writer.writerow([f"{row / SAMPLE_RATE:.2f}", *values, watch.recording_label(index)])
                row += 1
    print(
        f"wrote {args.out}: window of {watch.recording_label(first)}; {watch.recording_label(first)} then "
        f"{watch.recording_label(second)}, {PART_SECONDS} s each"
    )


if __name__ == "__main__":
    main()
