"""The ``dmft`` command line: build data, fit teacher and student, evaluate a bundle."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from model.config import TrainConfig

log = logging.getLogger("dmft")

# The extra that installs what a command needs beyond the base install; the others need `torch`.
EXTRA_OF_COMMAND = {"data": "train", "fit": "train", "export": "export"}


def cmd_data(args: argparse.Namespace) -> int:
    from model.data import save_npz
    from model.watch import build_watch_dataset

    dataset, recordings = build_watch_dataset(window_seconds=args.window_seconds, hop_seconds=args.hop_seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_npz(args.out, dataset, recording=recordings)
    log.info("wrote %s: %d windows, classes %s", args.out, len(dataset), ", ".join(dataset.class_names))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from model.pipeline import run_fit

    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        augment=not args.no_augment,
        modality_dropout=0.0 if args.no_modality_dropout else args.modality_dropout,
    )
    command = "dmft " + shlex.join(sys.argv[1:])
    metrics = run_fit(
        args.data,
        args.out,
        config,
        seed=args.seed,
        device=args.device,
        command=command,
        window_seconds=args.window_seconds,
    )
    summary = {
        name: {key: metrics[name][key] for key in ("accuracy", "macro_f1", "params")} for name in ("teacher", "student")
    }
    print(json.dumps(summary))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from model.bundle import load_bundle
    from model.data import load_npz, train_test_split
    from model.evaluation import classification_report, relabel

    bundle = load_bundle(args.bundle, device=args.device)
    dataset = load_npz(args.data, args.window_seconds)
    if args.split == "test":
        dataset = dataset.subset(train_test_split(dataset).test)
    inputs = {name: dataset.arrays[name] for name in bundle.window_samples if name in dataset.arrays}
    probabilities = np.concatenate(
        [
            bundle.predict({name: array[start : start + 512] for name, array in inputs.items()})
            for start in range(0, len(dataset), 512)
        ]
    )
    # The bundle's class order is authoritative; map the file's labels onto it by name.
    y_true = relabel(dataset.y, dataset.class_names, bundle.class_names)
    report = classification_report(y_true, probabilities.argmax(axis=1), bundle.class_names)
    report.update({"model": bundle.name, "version": bundle.version, "split": args.split, "modalities": sorted(inputs)})
    print(json.dumps(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model.export import export_onnx

    exported = export_onnx(args.bundle, args.out, precision=args.quantize or "float32", data=args.data)
    summary = {key: exported.manifest[key] for key in ("name", "version", "precision", "onnx_sha256")}
    summary.update(out=str(args.out), bytes=args.out.stat().st_size, accuracy=exported.metrics.get("accuracy"))
    print(json.dumps(summary))
    return 0


# Adds sub-commands to the parser; the service package contributes ``serve`` this way.
Extension = Callable[[argparse._SubParsersAction], None]


def build_parser(extensions: Iterable[Extension] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmft", description="DMFT human activity recognition")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build a dataset file")
    data.add_argument("source", choices=["watch"], help="'watch': smartwatch exercises shipped in seglearn")
    data.add_argument("--out", type=Path, required=True, help="output .npz")
    data.add_argument("--window-seconds", type=float, default=2.0)
    data.add_argument("--hop-seconds", type=float, default=1.0)
    data.set_defaults(handler=cmd_data)

    defaults = TrainConfig()
    fit = commands.add_parser("fit", help="train the teacher, distil the student, evaluate both")
    fit.add_argument("--data", type=Path, required=True, help="dataset .npz")
    fit.add_argument("--out", type=Path, required=True, help="output directory")
    fit.add_argument("--epochs", type=int, default=defaults.epochs)
    fit.add_argument("--batch-size", type=int, default=defaults.batch_size)
    fit.add_argument("--lr", type=float, default=defaults.lr)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    fit.add_argument("--window-seconds", type=float, help="needed only when the file has no sample rates")
    fit.add_argument("--modality-dropout", type=float, default=defaults.modality_dropout)
    fit.add_argument("--no-modality-dropout", action="store_true", help="ablation: never drop a modality")
    fit.add_argument("--no-augment", action="store_true", help="ablation: no rotation/scale/shift/jitter")
    fit.set_defaults(handler=cmd_fit)

    evaluate = commands.add_parser("evaluate", help="evaluate a bundle on a dataset; prints JSON")
    evaluate.add_argument("--bundle", type=Path, required=True)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--split", choices=["test", "all"], default="test")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--window-seconds", type=float)
    evaluate.set_defaults(handler=cmd_evaluate)

    export = commands.add_parser("export", help="export a bundle to ONNX (with a JSON sidecar) for torch-free runtimes")
    export.add_argument("--bundle", type=Path, required=True, help="bundle directory (teacher or student)")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="file format")
    export.add_argument("--out", type=Path, required=True, help="output .onnx; the sidecar is the .json beside it")
    export.add_argument("--quantize", choices=["int8"], help="static int8 quantization (needs --data)")
    export.add_argument("--data", type=Path, help="dataset .npz: its training windows calibrate int8")
    export.set_defaults(handler=cmd_export)
    for extend in extensions:
        extend(commands)
    return parser


def main(argv: list[str] | None = None, extensions: Iterable[Extension] = ()) -> int:
    args = build_parser(extensions).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from model.data import DatasetError
    from model.errors import TrainingError

    try:
        return args.handler(args)
    except (DatasetError, TrainingError, FileNotFoundError, ValueError) as error:
        print(f"dmft {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        # The base install has no model runtime; each command names the extra it needs.
        extra = EXTRA_OF_COMMAND.get(args.command, "torch")
        print(f"dmft {args.command}: error: {error}; pip install 'dmft-activity[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
