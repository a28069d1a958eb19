"""Event streams under load, against real ``dmft serve`` processes (run from the repository root).

Fan-out: the latency of another session's chunks, with no reader and then with 200 idle
readers of one session that holds 1,000 retained events, on the embedded store and on Redis.

Capacity (Redis, a redis-server of the benchmark's own, so its client count is exact): 200
sessions started at once, the overview of 150 of them, then 1,100 open event streams over those
sessions while each session gets one more chunk: how many answers were not 200, how many
streams ended early or missed their event, and how many connections the service held.

    python -m bench.event_streams [--readers 200] [--streams 1100] [--sessions 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import redis

from tools.stack import free_port, redis_prefix, run_service
from tools.traffic import MODALITIES, load_watch_data

LONG_TIMEOUT = httpx.Timeout(30, read=300)


def chunk(samples: dict, start: int, count: int) -> dict[str, list[list[float]]]:
    return {name: samples[name][start : start + count].tolist() for name in MODALITIES}


async def fill(client: httpx.AsyncClient, session_id: str, samples: dict, windows: int) -> None:
    """Stream ``session_id`` until it has committed ``windows`` windows (hence as many events)."""
    seq, start, step = 0, 0, 2500  # 50 s of samples per chunk: 50 windows
    done = 0
    while done < windows:
        rows = chunk(samples, start % (len(samples["accelerometer"]) - step), step)
        answer = await client.post(f"/v1/sessions/{session_id}/samples", json={"seq": seq, "modalities": rows})
        answer.raise_for_status()
        done += len(answer.json()["predictions"])
        seq, start = seq + 1, start + step


async def chunk_latencies(client: httpx.AsyncClient, session_id: str, samples: dict, count: int) -> list[float]:
    """Milliseconds per chunk of one second (one window each) to a fresh session."""
    latencies = []
    first = await client.post(
        f"/v1/sessions/{session_id}/samples", json={"seq": 0, "modalities": chunk(samples, 0, 100)}
    )
    first.raise_for_status()
    for seq in range(1, count + 1):
        began = time.perf_counter()
        answer = await client.post(
            f"/v1/sessions/{session_id}/samples", json={"seq": seq, "modalities": chunk(samples, 50 + 50 * seq, 50)}
        )
        latencies.append((time.perf_counter() - began) * 1000)
        answer.raise_for_status()
    return latencies


async def idle_readers(client: httpx.AsyncClient, session_id: str, count: int, opened: asyncio.Event) -> None:
    ready = 0

    async def one() -> None:
        nonlocal ready
        async with client.stream("GET", f"/v1/sessions/{session_id}/events") as response:
            ready += 1
            if ready == count:
                opened.set()
            async for _ in response.aiter_lines():
                pass

    await asyncio.gather(*(one() for _ in range(count)))


async def fan_out(base: str, samples: dict, readers: int) -> tuple[float, float]:
    """Median chunk latency of another session without readers, then with ``readers`` idle ones."""
    # The readers have a client of their own: a pool full of open streams would slow the measured one.
    limits = httpx.Limits(max_connections=readers + 20)
    async with (
        httpx.AsyncClient(base_url=base, timeout=LONG_TIMEOUT, trust_env=False) as client,
        httpx.AsyncClient(base_url=base, limits=limits, timeout=LONG_TIMEOUT, trust_env=False) as reader_client,
    ):
        await fill(client, "followed", samples, 1000)
        alone = statistics.median(await chunk_latencies(client, "other-1", samples, 40))
        opened = asyncio.Event()
        reading = asyncio.create_task(idle_readers(reader_client, "followed", readers, opened))
        await asyncio.wait_for(opened.wait(), 120)
        watched = statistics.median(await chunk_latencies(client, "other-2", samples, 40))
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    return alone, watched


async def capacity(base: str, samples: dict, sessions: int, streams: int, redis_url: str) -> dict[str, int]:
    ids = [f"cap-{i}" for i in range(sessions)]
    limits = httpx.Limits(max_connections=streams + sessions + 20)
    figures: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=LONG_TIMEOUT, trust_env=False) as client:

        async def post(session_id: str, seq: int, rows: dict) -> int:
            body = {"seq": seq, "modalities": rows}
            return (await client.post(f"/v1/sessions/{session_id}/samples", json=body)).status_code

        first = await asyncio.gather(*(post(session_id, 0, chunk(samples, 0, 100)) for session_id in ids))
        figures["session starts not 200"] = sum(status != 200 for status in first)
        figures["overview limit=150 status"] = (await client.get("/v1/overview", params={"limit": 150})).status_code

        opened, got, ended_early = 0, 0, 0
        all_open = asyncio.Event()

        async def follow(session_id: str) -> None:
            nonlocal opened, got, ended_early
            async with client.stream("GET", f"/v1/sessions/{session_id}/events") as response:
                opened += 1
                if opened == streams:
                    all_open.set()
                async for line in response.aiter_lines():
                    if line == "event: prediction":
                        got += 1
                        return
            ended_early += 1

        readers = [asyncio.create_task(follow(ids[i % sessions])) for i in range(streams)]
        await asyncio.wait_for(all_open.wait(), 300)
        await asyncio.sleep(2)
        info = redis.Redis.from_url(redis_url)
        figures["redis connections with streams open"] = int(info.info("clients")["connected_clients"]) - 1
        info.close()
        second = await asyncio.gather(*(post(session_id, 1, chunk(samples, 100, 50)) for session_id in ids))
        figures["chunks with streams open not 200"] = sum(status != 200 for status in second)
        await asyncio.wait(readers, timeout=60)
        for reader in readers:
            reader.cancel()
        figures["streams opened"] = opened
        figures["streams that got their event"] = got
        figures["streams ended early"] = ended_early
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--streams", type=int, default=1100)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis of the fan-out run")
    args = parser.parse_args()
    watch = load_watch_data()
    longest = max(range(len(watch.raw["X"])), key=lambda i: len(watch.raw["X"][i]))
    samples = watch.recording_samples(longest)

    with tempfile.TemporaryDirectory() as workdir:
        for store in ("memory", "redis"):
            with redis_prefix(args.redis_url, "bench-fanout") as prefix:
                redis_options = {"redis_url": args.redis_url, "redis_prefix": prefix} if store == "redis" else {}
                with run_service(Path(workdir) / store, **redis_options) as server:
                    alone, watched = asyncio.run(fan_out(server.base, samples, args.readers))
            print(
                f"fan-out, {store}: chunk p50 {alone:.1f} ms alone, {watched:.1f} ms with {args.readers} idle readers "
                f"of a session holding 1,000 events (x{watched / alone:.2f})"
            )

        port = free_port()
        private = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxclients", "10000", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(0.5)
            url = f"redis://127.0.0.1:{port}/0"
            with run_service(Path(workdir) / "capacity", redis_url=url, redis_prefix="bench") as server:
                figures = asyncio.run(capacity(server.base, samples, args.sessions, args.streams, url))
        finally:
            private.terminate()
            private.wait()
    print(f"capacity, redis: {args.sessions} sessions, {args.streams} streams")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
