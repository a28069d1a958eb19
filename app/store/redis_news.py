"""News of sessions over Redis sharded pub/sub, for the readers waiting in this process.

The scripts that change a session publish on its channel (``SPUBLISH``, from inside the
script, so news never precedes what it announces). This process subscribes to a channel
while readers of it wait, and one connection (one per node of a cluster) carries the news of
every channel followed, so a thousand open event streams cost one connection rather than a
thousand blocked reads.

A reader subscribes before it looks (``watch`` returns once Redis confirmed the
subscription), so news published while it looks is not lost. A channel stays subscribed for
``LINGER_SECONDS`` after its last reader leaves, as a reader's next wait follows at once.
When a connection drops, or a cluster's slot moves, every reader is woken to look again, and
again once subscriptions are back: news sent in between is lost, what it announced is not.
A cluster's subscriptions follow its slots as redis-py's cluster client learns where they
moved; meanwhile a reader still wakes at every keep-alive and at its session's expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.exceptions import RedisError

from app.store.base import StoreUnavailable
from app.store.wakeups import Wakeups

log = logging.getLogger(__name__)

LINGER_SECONDS = 10.0
CONFIRM_TIMEOUT_SECONDS = 2.0
RECONNECT_DELAY_SECONDS = 0.5
# A cluster's subscriptions live on several nodes, which redis-py reads in turn, this long each.
CLUSTER_READ_SECONDS = 0.05


class RedisNews:
    def __init__(
        self,
        client: Redis | RedisCluster,
        outage: tuple[type[BaseException], ...],
        discovered: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._outage = outage
        self._discovered = discovered  # a cluster client must know the slots before it subscribes
        self._pubsub: PubSub | None = None
        self._wakeups = Wakeups()
        self._confirmed: dict[str, asyncio.Future[None]] = {}  # channel -> its subscription's confirmation
        self._leaving: dict[str, int] = {}  # channel -> confirmations of this process's unsubscribing still to come
        self._linger: dict[str, asyncio.TimerHandle] = {}
        self._connecting: asyncio.Task[PubSub] | None = None
        self._listening: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._reconnecting = False

    @contextlib.asynccontextmanager
    async def watch(self, *channels: str) -> AsyncIterator[asyncio.Future[None]]:
        """A future that news on any of ``channels`` completes, subscribed when this yields; ``StoreUnavailable``
        if Redis cannot confirm a subscription."""
        try:
            with self._wakeups.watch(*channels) as news:
                for channel in channels:
                    if handle := self._linger.pop(channel, None):
                        handle.cancel()
                for channel in channels:
                    await self._subscribe(channel)
                yield news
        finally:
            loop = asyncio.get_running_loop()
            for channel in channels:
                if not self._wakeups.watched(channel) and channel not in self._linger:
                    self._linger[channel] = loop.call_later(LINGER_SECONDS, self._unsubscribe, channel)

    async def _subscribe(self, channel: str) -> None:
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            confirmed = asyncio.get_running_loop().create_future()
            self._confirmed[channel] = confirmed
            # In a task of its own: a reader cancelled meanwhile (its client gone) must not leave the
            # subscription half asked for, with every later reader waiting for its confirmation.
            self._in_background(self._ask(channel, confirmed))
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT_SECONDS):
                await asyncio.shield(confirmed)
        except TimeoutError as error:
            self._forget(channel, confirmed)  # the next reader asks again
            raise StoreUnavailable(f"Redis did not confirm the subscription to {channel}") from error

    async def _ask(self, channel: str, confirmed: asyncio.Future[None]) -> None:
        try:
            pubsub = await self._connected()
            await pubsub.ssubscribe(channel)
        except Exception as error:  # whatever it is, the readers waiting for the confirmation hear of it
            if not isinstance(error, (*self._outage, RedisError)):
                log.exception("subscribing to %s failed", channel)
            self._forget(channel, confirmed)
            if not confirmed.done():
                confirmed.set_exception(StoreUnavailable(str(error)))
                confirmed.exception()  # retrieved here too: no reader may be waiting for it any more

    def _forget(self, channel: str, confirmed: asyncio.Future[None]) -> None:
        if self._confirmed.get(channel) is confirmed:
            del self._confirmed[channel]

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _connected(self) -> PubSub:
        """The subscriber, connected once however many readers come at the same time."""
        connecting = self._connecting
        if connecting is None or (connecting.done() and (connecting.cancelled() or connecting.exception() is not None)):
            self._connecting = asyncio.get_running_loop().create_task(self._connect(), name="redis-news-connect")
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> PubSub:
        if self._discovered is not None:
            await self._discovered()
        pubsub = self._client.pubsub()
        if not isinstance(pubsub, ClusterPubSub):  # a cluster's subscriber connects to each node as it needs
            await pubsub.connect()
        self._pubsub = pubsub
        self._listening = asyncio.get_running_loop().create_task(self._listen(pubsub), name="redis-news")
        return pubsub

    def _unsubscribe(self, channel: str) -> None:
        self._linger.pop(channel, None)
        if self._wakeups.watched(channel) or self._confirmed.pop(channel, None) is None:
            return
        self._leave(channel)

    def _leave(self, channel: str) -> None:
        if self._pubsub is None:
            return
        self._leaving[channel] = self._leaving.get(channel, 0) + 1
        self._in_background(self._send_unsubscribe(self._pubsub, channel))

    async def _send_unsubscribe(self, pubsub: PubSub, channel: str) -> None:
        try:
            await pubsub.sunsubscribe(channel)
        except (*self._outage, RedisError) as error:  # the subscription goes with the connection anyway
            log.debug("unsubscribing from %s failed: %s", channel, error)

    async def _next_message(self, pubsub: PubSub) -> dict | None:
        if isinstance(pubsub, ClusterPubSub):
            began = time.monotonic()
            message = await pubsub.get_sharded_message(timeout=CLUSTER_READ_SECONDS)
            if message is None:  # it answers at once while no node has a subscription
                await asyncio.sleep(max(0.0, CLUSTER_READ_SECONDS - (time.monotonic() - began)))
            return message
        return await pubsub.get_message(timeout=None)

    async def _listen(self, pubsub: PubSub) -> None:
        while True:
            try:
                message = await self._next_message(pubsub)
            except Exception as error:  # a bug as well must not end the news for good
                # A connection lost, or a subscription answered from a node that no longer holds its slot.
                if not isinstance(error, (*self._outage, RedisError)):
                    log.exception("session news failed")
                elif not self._reconnecting:
                    log.warning("session news interrupted: %s", error)
                self._reconnecting = True
                self._leaving.clear()  # the connection took the subscriptions, and their confirmations
                self._wakeups.wake_all()  # readers look again: they may have missed news
                await asyncio.sleep(RECONNECT_DELAY_SECONDS)
                continue
            if message is not None:
                self._receive(message)

    def _receive(self, message: dict) -> None:
        kind = _text(message["type"])
        channel = _text(message["channel"]) if message.get("channel") is not None else ""
        if self._reconnecting and kind == "ssubscribe":
            # Subscriptions are back: news sent meanwhile is lost, so everyone looks again.
            self._reconnecting = False
            log.info("session news resumed")
            self._wakeups.wake_all()
        if kind == "smessage":
            self._wakeups.wake(channel)
        elif kind == "ssubscribe":
            confirmed = self._confirmed.get(channel)
            if confirmed is None:  # renewed by a reconnection after this process had let it go
                self._leave(channel)
            elif not confirmed.done():
                confirmed.set_result(None)
        elif kind == "sunsubscribe":
            confirmed = self._confirmed.get(channel)
            if self._leaving.get(channel, 0) > 0:
                self._leaving[channel] -= 1
                if not self._leaving[channel]:
                    del self._leaving[channel]
            elif confirmed is not None and confirmed.done():
                # A subscription this process still wants ended: its slot moved to another node, and redis-py
                # moves the subscription there once it has learnt where. Until that is confirmed its readers
                # look again and wait for the confirmation, or give up and come back.
                self._confirmed[channel] = asyncio.get_running_loop().create_future()
                self._wakeups.wake(channel)

    async def close(self) -> None:
        for handle in self._linger.values():
            handle.cancel()
        self._linger.clear()
        tasks = [task for task in (self._connecting, self._listening, *self._background) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
