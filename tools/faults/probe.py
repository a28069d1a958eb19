"""What a fault run measures: every answer by status against a time bound, and the memory of the service's processes.

A ``Tally`` takes each request's outcome (an HTTP status, or ``"dropped"`` when the connection
broke without an answer) and how long it took; what the service must never do is a problem:
a 5xx other than 503, a 503 without ``Retry-After``, an error outside the one error shape, a
status the run did not allow, or an answer later than the bound (a hang). ``MemoryWatch``
samples the resident memory of a process group (``dmft serve``, its workers and their
inference processes) in a thread; ``read_answer`` reads an HTTP/1.1 answer from a bare socket,
cheap enough to hold a thousand of them open from one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

DROPPED = "dropped"  # the connection broke, or was refused, before an answer came
ERROR_KEYS = {"code", "message", "details", "request_id"}
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


@dataclass
class Tally:
    """Outcomes of one run's requests, and what was wrong with them."""

    bound_s: float  # every request is answered (or dropped) within this
    allowed: frozenset[str] = frozenset({"200", "204", "503"})
    refused_codes: frozenset[str] = frozenset()  # error codes that are problems although their status is allowed
    statuses: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def record(
        self, status: int | str, elapsed_s: float, *, headers: Any = None, body: bytes = b"", what: str = ""
    ) -> None:
        """One request's outcome; ``headers`` and ``body`` of an HTTP answer are checked against the error shape."""
        outcome = str(status)
        self.statuses[outcome] += 1
        self.slowest_s = max(self.slowest_s, elapsed_s)
        if elapsed_s > self.bound_s:
            self.problem(f"{what}: {outcome} after {elapsed_s:.1f} s (bound {self.bound_s:g} s)")
        if outcome not in self.allowed:
            self.problem(f"{what}: {outcome} {body[:200]!r}")
        if isinstance(status, int) and status >= 400:
            self._check_error(status, headers, body, what)

    def record_answer(self, answer: httpx.Response | Answer, elapsed_s: float, *, what: str) -> None:
        """An HTTP answer's outcome (of httpx, or read from a bare socket)."""
        self.record(answer.status_code, elapsed_s, headers=answer.headers, body=answer.content, what=what)

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:  # enough to see what went wrong, without a million lines
            self.problems.append(text)

    def merge(self, other: Tally) -> None:
        self.statuses.update(other.statuses)
        self.slowest_s = max(self.slowest_s, other.slowest_s)
        for text in other.problems:
            self.problem(text)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def _check_error(self, status: int, headers: Any, body: bytes, what: str) -> None:
        try:
            error = json.loads(body)["error"]
            shaped = set(error) == ERROR_KEYS and isinstance(error["details"], list)
        except (ValueError, KeyError, TypeError):
            shaped = False
        if not shaped:
            self.problem(f"{what}: {status} outside the error shape: {body[:200]!r}")
        elif error["code"] in self.refused_codes:
            self.problem(f"{what}: {status} {error['code']}: {error['message']}")
        if status == 503 and (headers is None or "retry-after" not in {name.lower() for name in headers}):
            self.problem(f"{what}: 503 without Retry-After")


@dataclass(frozen=True)
class Answer:
    """An answer read from a bare socket, named as httpx names its parts."""

    status_code: int
    headers: dict[str, str]
    content: bytes


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 answer: its status line, headers and body (by ``Content-Length``, else up to the close)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    body = await reader.readexactly(int(length)) if length is not None else await reader.read()
    return Answer(int(status_line.split()[1]), headers, body)


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def post_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """The bytes of a JSON POST that closes its connection after the answer."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def group_rss_bytes(group: int) -> dict[int, int]:
    """Resident bytes of each live process of process group ``group``."""
    sizes = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # gone meanwhile
        # After the command's ")": state, ppid, pgrp, ...; rss (in pages) is field 24 of stat, 22 here.
        if int(fields[2]) == group:
            sizes[int(entry.name)] = int(fields[21]) * PAGE_BYTES
    return sizes


class MemoryWatch:
    """The resident memory of a process group, summed over its processes, sampled every ``interval_s`` while the
    block runs: at its start, its peak, and at its end."""

    def __init__(self, group: int, *, interval_s: float = 0.2) -> None:
        self.group = group
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.end_bytes = 0
        self.peak_process_bytes = 0  # the largest one process was
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self.start_bytes = self._sample()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.end_bytes = self._sample()

    @property
    def growth_bytes(self) -> int:
        """How far the peak rose above the start."""
        return self.peak_bytes - self.start_bytes

    def _sample(self) -> int:
        sizes = group_rss_bytes(self.group)
        total = sum(sizes.values())
        self.peak_bytes = max(self.peak_bytes, total)
        self.peak_process_bytes = max(self.peak_process_bytes, *sizes.values(), 0)
        return total

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()
