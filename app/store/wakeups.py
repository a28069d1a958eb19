"""Readers waiting for news of one key (a session's events, the outbox), woken by news of that key alone.

A reader registers before it looks, so news that comes while it looks is not missed, and waits
on a future of its own. Nothing here holds a lock across an ``await``: a reader cancelled at any
point (a client that goes away) leaves nothing behind but its own future, which it removes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class Wakeups:
    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}

    @contextlib.contextmanager
    def watch(self, *keys: str) -> Iterator[asyncio.Future[None]]:
        """A future that news of any of ``keys`` completes, for as long as the block runs."""
        news: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._waiting.setdefault(key, set()).add(news)
        try:
            yield news
        finally:
            for key in keys:
                waiting = self._waiting.get(key)
                if waiting is not None:
                    waiting.discard(news)
                    if not waiting:
                        del self._waiting[key]

    def wake(self, key: str) -> None:
        for news in self._waiting.get(key, ()):
            if not news.done():
                news.set_result(None)

    def wake_all(self) -> None:
        for key in list(self._waiting):
            self.wake(key)

    def watched(self, key: str) -> bool:
        return key in self._waiting


async def wait_for_news(news: asyncio.Future[None], seconds: float) -> None:
    """Return when ``news`` comes or ``seconds`` have passed, whichever is first."""
    if seconds <= 0 or news.done():
        return
    # asyncio.timeout cancels only this await; unlike asyncio.wait_for it starts no task that could
    # outlive a reader cancelled twice.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await news
