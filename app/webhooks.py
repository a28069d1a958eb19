"""Webhook delivery: every transition, POSTed to each configured target, signed, in order, retried.

Transitions reach the store's outbox in the same commit that records them, so a
delivery can't be lost between the two. Per target, one API process at a time holds a
lease on delivery and walks the outbox from the target's cursor: one event after the
other, so each session's events arrive in order. A failed POST (network error or any
non-2xx answer) is retried with exponential backoff, holding back the events behind
it, until ``webhook_give_up_seconds`` have passed since its transition was committed; then
it is counted as dropped and delivery moves on. Ingestion never waits for any of this.

Each request carries ``X-DMFT-Signature: sha256=<hex>``, the HMAC-SHA256 with the
target's secret of ``<X-DMFT-Timestamp>.<body>``, so a receiver can check both who sent
it and that it is fresh. ``X-DMFT-Event-Id`` lets a receiver drop a repeat: if a
process dies after a POST but before moving the cursor, the next holder sends that
event again (at least once, never out of order).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid

import httpx

from app import metrics
from app.settings import Settings, WebhookTarget
from app.store import OutboxEntry, SessionStore, StoreUnavailable, parse_event_id

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-DMFT-Signature"
TIMESTAMP_HEADER = "X-DMFT-Timestamp"
EVENT_ID_HEADER = "X-DMFT-Event-Id"
OUTBOX_BATCH = 100


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def target_key(target: WebhookTarget) -> str:
    """A stable name for the target's cursor and lease: its URL, hashed (the URL may carry credentials)."""
    return hashlib.sha256(str(target.url).encode()).hexdigest()[:16]


class _LostLease(Exception):
    """Another process took over this target's delivery."""


class WebhookDispatcher:
    def __init__(self, store: SessionStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.owner = uuid.uuid4().hex  # this process, for the leases
        self._client = httpx.AsyncClient(timeout=settings.webhook_timeout_seconds, trust_env=False)
        self._tasks: list[asyncio.Task[None]] = []
        self._start_after = "0-0"

    async def start(self) -> None:
        """Open the outbox (before this process takes requests), then deliver to each target in a task."""
        if not self.settings.webhooks:
            return
        # A target seen for the first time gets the transitions from this process's start on, with a
        # second's margin for other processes starting beside it.
        self._start_after = f"{int(time.time() * 1000) - 1000}-0"
        try:
            await self.store.open_outbox()
        except StoreUnavailable as error:  # the service starts without its store; delivery opens it later
            log.warning("webhook outbox not opened yet: %s", error)
        for target in self.settings.webhooks:
            self._tasks.append(asyncio.create_task(self._deliver_forever(target), name=f"webhook-{target_key(target)}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    async def _hold(self, key: str) -> str:
        """Renew this process's lease on ``key``; its cursor. Raises ``_LostLease`` when another process has it."""
        cursor = await self.store.hold_delivery(
            key, self.owner, lease_seconds=self.settings.webhook_lease_seconds, start_after=self._start_after
        )
        if cursor is None:
            raise _LostLease(f"another process delivers to {key}")
        return cursor

    async def _deliver_forever(self, target: WebhookTarget) -> None:
        key = target_key(target)
        while True:
            try:
                await self.store.open_outbox()  # again: Redis may have restarted without it
                cursor = await self._hold(key)
                for entry in await self.store.read_outbox(cursor, limit=OUTBOX_BATCH, wait_seconds=1.0):
                    await self._deliver(target, key, entry)
                    if not await self.store.advance_delivery(key, self.owner, entry.position):
                        break
            except _LostLease:
                await asyncio.sleep(self.settings.webhook_lease_seconds / 3)  # to take over if its holder dies
            except StoreUnavailable as error:
                log.warning("webhook delivery to %s paused: %s", key, error)
                await asyncio.sleep(self.settings.retry_after_seconds)
            except Exception:  # a bug or an unexpected store answer must not end delivery for good
                log.exception("webhook delivery to %s failed", key)
                await asyncio.sleep(self.settings.retry_after_seconds)

    async def _deliver(self, target: WebhookTarget, key: str, entry: OutboxEntry) -> None:
        """POST one event until it is accepted or too old.

        The lease is renewed before every attempt and during every wait: a POST starts only while
        this process holds the lease for longer than the POST may take (settings check that the
        timeout is shorter than the lease), so no other process sends the next event meanwhile.
        The give-up clock is the event's commit time, in its outbox id: it runs on whichever
        process holds the lease.
        """
        body = json.dumps({"event_id": entry.event_id, **json.loads(entry.data)}, separators=(",", ":")).encode()
        secret = target.secret.get_secret_value()
        committed_at = parse_event_id(entry.id)[0] / 1000
        delay = self.settings.webhook_initial_backoff_seconds
        while True:
            await self._hold(key)
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(secret, timestamp, body),
                EVENT_ID_HEADER: entry.event_id,
            }
            try:
                response = await self._client.post(str(target.url), content=body, headers=headers)
                failure = None if response.is_success else f"HTTP {response.status_code}"
            except httpx.HTTPError as error:
                failure = f"{type(error).__name__}: {error}"
            if failure is None:
                metrics.WEBHOOK_DELIVERIES.labels(outcome="delivered").inc()
                metrics.WEBHOOK_LAG.observe(max(0.0, time.time() - committed_at))
                return
            metrics.WEBHOOK_DELIVERIES.labels(outcome="failed").inc()
            if time.time() + delay - committed_at > self.settings.webhook_give_up_seconds:
                metrics.WEBHOOK_DELIVERIES.labels(outcome="dropped").inc()
                log.error("webhook %s: gave up on event %s (%s)", key, entry.event_id, failure)
                return
            log.warning("webhook %s: event %s failed (%s); retrying in %.1f s", key, entry.event_id, failure, delay)
            await self._wait_holding(key, delay)
            delay = min(delay * 2, self.settings.webhook_max_backoff_seconds)

    async def _wait_holding(self, key: str, seconds: float) -> None:
        """Sleep ``seconds``, renewing the lease often enough that no other process takes the target over."""
        renew_every = self.settings.webhook_lease_seconds / 3
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(remaining, renew_every))
            await self._hold(key)
