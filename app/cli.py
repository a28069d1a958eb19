"""The ``dmft`` console script: the model's commands plus ``serve``, ``replay`` and ``mqtt-bridge``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
from pathlib import Path

from app.mqtt.limits import BridgeLimits
from model import cli as model_cli


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless it has none to show (its help says what then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from app.server import ServeOptions, serve

    # Checked here, not in every worker process: a missing model runtime stops the command with the
    # extra to install (the worker processes would only die on it, one after the other).
    if importlib.util.find_spec("torch") is None:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    # Settings reach every worker process through the environment.
    if args.bundles:
        os.environ["DMFT_BUNDLES"] = str(args.bundles)
    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url
    options = ServeOptions(
        host=args.host, port=args.port, workers=args.workers, log_level=args.log_level, access_log=args.access_log
    )
    return serve(options)


def add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the HTTP service (uvicorn). Its settings are DMFT_* environment variables; see the README.",
        formatter_class=HelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="uvicorn worker processes; more than one needs Redis (--redis-url), else one serves",
    )
    serve.add_argument(
        "--bundles",
        type=Path,
        help="directory with teacher/ and student/ (default: DMFT_BUNDLES, else the shipped models)",
    )
    serve.add_argument(
        "--redis-url", help="Redis for sessions (default: REDIS_URL; unset: sessions in the process, one worker)"
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level",
    )
    serve.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True, help="log a line per request"
    )
    serve.set_defaults(handler=cmd_serve)


def _speed(text: str) -> float | None:
    """``--speed``: a factor of real time, or 'max' for no pause between chunks."""
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive factor (1, 10 ...) nor 'max'")
    return value


def cmd_replay(args: argparse.Namespace) -> int:
    import functools

    from app.client import SESSION_ID, ActivityClient, ClientError
    from app.replay import Lines, ProgressBar, ReplayInputError, Summary, check_against_model, load_recording, replay
    from app.schemas import SESSION_ID_RULE

    if not SESSION_ID.fullmatch(args.session):
        raise ReplayInputError(f"--session {args.session!r}: {SESSION_ID_RULE}")
    if not args.chunk_seconds > 0:
        raise ReplayInputError("--chunk-seconds must be positive")
    recording = load_recording(args.file, args.recording)
    # httpx logs every request; the replay reports its own progress.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    echo = functools.partial(print, flush=True)
    summary = Summary()
    status = 0
    with ActivityClient(args.url) as client:
        try:
            models = {info.name: info for info in client.models().models}
            check_against_model(recording, models["teacher" if args.model == "teacher" else "student"])
            tty = sys.stdout.isatty()
            report = ProgressBar(recording.chunk_count(args.chunk_seconds), args.session) if tty else Lines(echo)
            try:
                replay(
                    recording,
                    client,
                    args.session,
                    model=args.model,
                    speed=args.speed,
                    chunk_seconds=args.chunk_seconds,
                    report=report,
                    summary=summary,
                )
            finally:
                report.close()  # the bar ends above what is printed next
        except ClientError as error:
            print(f"dmft replay: error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            echo("interrupted")
            status = 130
    for line in summary.lines():
        echo(line)
    return status


def add_replay(commands: argparse._SubParsersAction) -> None:
    replay = commands.add_parser(
        "replay",
        help="stream a recording to a session and score the predictions",
        description="Stream a recording to a new session as a sensor gateway would, and score the predictions. "
        "On a terminal a progress bar shows the chunks sent; otherwise each window and transition is a line.",
        formatter_class=HelpFormatter,
    )
    replay.add_argument("file", type=Path, help=".npz window dataset (with 'recording') or .csv with a time column")
    replay.add_argument("--session", required=True, help="session id to stream to, a new one (required)")
    replay.add_argument(
        "--speed", type=_speed, default=1.0, help="times real time: 1 (real time), 10, ..., or max (no pauses)"
    )
    replay.add_argument(
        "--url", default=os.environ.get("DMFT_URL", "http://127.0.0.1:8000"), help="the service (else DMFT_URL)"
    )
    replay.add_argument(
        "--model", choices=["student", "teacher", "cascade"], default="student", help="model of the session"
    )
    replay.add_argument("--chunk-seconds", type=float, default=1.0, help="seconds of samples per chunk")
    replay.add_argument("--recording", type=int, help="recording id in an .npz file (default: the file's first)")
    replay.set_defaults(handler=cmd_replay)


def cmd_mqtt_bridge(args: argparse.Namespace) -> int:
    import asyncio

    from app.mqtt.bridge import BrokerConfig, serve
    from app.mqtt.discovery import Topics
    from app.settings import Settings

    for option, prefix in (("--topic-prefix", args.topic_prefix), ("--discovery-prefix", args.discovery_prefix)):
        if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"{option} {prefix!r}: a topic without wildcards or a leading or trailing '/'")
    overrides = {"bundles": args.bundles, "redis_url": args.redis_url}
    settings = Settings(**{key: value for key, value in overrides.items() if value})
    if not settings.redis_url:
        logging.getLogger("dmft").warning("no Redis: sessions fed over MQTT are not seen by the HTTP service")
    broker = BrokerConfig(
        host=args.broker_host,
        port=args.broker_port,
        client_id=args.client_id,
        username=args.username,
        password=os.environ.get("DMFT_MQTT_PASSWORD"),
    )
    limits = BridgeLimits(max_sessions=args.max_sessions, max_queued_chunks=args.max_queued_chunks)
    asyncio.run(serve(settings, broker, Topics(args.topic_prefix, args.discovery_prefix), limits))
    return 0


def add_mqtt_bridge(commands: argparse._SubParsersAction) -> None:
    bridge = commands.add_parser(
        "mqtt-bridge",
        help="feed sessions from MQTT; announce them to Home Assistant",
        description="Feed sessions from an MQTT broker through the service's session logic, and announce "
        "them to Home Assistant. Its service settings are DMFT_* environment variables; see the README.",
        formatter_class=HelpFormatter,
    )
    bridge.add_argument("--broker-host", default="127.0.0.1", help="the MQTT broker")
    bridge.add_argument("--broker-port", type=int, default=1883, help="the broker's port")
    bridge.add_argument("--username", help="broker login (default: none); its password is read from DMFT_MQTT_PASSWORD")
    bridge.add_argument("--client-id", default="", help="MQTT client id (default: none, the broker assigns one)")
    bridge.add_argument("--topic-prefix", default="dmft", help="topics are <prefix>/<session>/samples, /state ...")
    bridge.add_argument("--discovery-prefix", default="homeassistant", help="Home Assistant's discovery prefix")
    bridge.add_argument(
        "--bundles", type=Path, help="directory with teacher/ and student/ (default: DMFT_BUNDLES, else the shipped)"
    )
    bridge.add_argument("--redis-url", help="Redis shared with the HTTP service (default: REDIS_URL)")
    defaults = BridgeLimits()
    bridge.add_argument(
        "--max-sessions",
        type=_positive_int,
        default=defaults.max_sessions,
        help="sessions carried at once; a chunk of one more is answered 'overloaded'",
    )
    bridge.add_argument(
        "--max-queued-chunks",
        type=_positive_int,
        default=defaults.max_queued_chunks,
        help="chunks one session may have waiting; more are answered 'overloaded'",
    )
    bridge.set_defaults(handler=cmd_mqtt_bridge)


def main(argv: list[str] | None = None) -> int:
    return model_cli.main(argv, extensions=[add_serve, add_replay, add_mqtt_bridge])


if __name__ == "__main__":
    raise SystemExit(main())
