"""The ``dmft`` console script: the model's commands plus ``serve``."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from model import cli as model_cli


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    # Settings reach every worker process through the environment.
    if args.bundles:
        os.environ["DMFT_BUNDLES"] = str(args.bundles)
    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url
    if args.workers > 1:
        prepare_multiprocess_metrics()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0


def prepare_multiprocess_metrics() -> None:
    """Give the workers one empty directory to share their metric samples in."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        # Files of a previous run would add stale samples to this one's.
        for stale in Path(directory).glob("*.db"):
            stale.unlink()
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dmft-metrics-")


def add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.add_argument("--bundles", type=Path, help="directory with teacher/ and student/ (else DMFT_BUNDLES)")
    serve.add_argument("--redis-url", help="Redis for sessions (else REDIS_URL; unset: in-process store)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    serve.set_defaults(handler=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    return model_cli.main(argv, extensions=[add_serve])


if __name__ == "__main__":
    raise SystemExit(main())
