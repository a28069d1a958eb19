"""The bridge between an MQTT broker and the session service, run in this process.

paho runs its callbacks on its own network thread; they do nothing but hand each message to
the asyncio loop, where one worker per session processes that session's chunks in the order
the broker delivered them (sessions proceed side by side). A chunk goes through the very
``SessionService.append`` of the HTTP app, on the same store, so a session may be fed over MQTT
and read over HTTP. Overload and store outages (503) are retried here, as the HTTP client
would, with the chunk's own ``seq``: a repeat is acknowledged as a duplicate, never appended twice.

What a topic may cost is bounded (``BridgeLimits``): a chunk for an invalid session id is
answered on the bridge's ``rejected`` topic before anything is kept for it; a session's worker
retires once it has been idle a while; and the workers, and the chunks each may hold queued,
are capped, a chunk beyond a cap answered ``overloaded`` on its session's error topic (to be
sent again later).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from app.client import SESSION_ID, RetryPolicy
from app.decoding import BodyFormat, Chunk, decode_chunk
from app.errors import ApiError, describe
from app.exceptions import DomainError, InvalidInput, Overloaded
from app.mqtt.discovery import OFFLINE, ONLINE, Topics, discovery_configs
from app.mqtt.limits import BridgeLimits
from app.schemas import SESSION_ID_RULE, SamplesResponse
from app.services import Services, open_services
from app.settings import Settings
from app.store import StoreUnavailable

log = logging.getLogger(__name__)

QOS = 1  # chunks and transitions must not be lost on the way; a repeated chunk is harmless
# How long shutdown waits for queued chunks to be processed and the last messages to leave.
DRAIN_SECONDS = 10.0


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # empty: the broker assigns one
    username: str | None = None
    password: str | None = None
    keepalive: int = 60


class MqttBridge:
    def __init__(
        self, services: Services, broker: BrokerConfig, topics: Topics, limits: BridgeLimits | None = None
    ) -> None:
        self.services = services
        self.broker = broker
        self.topics = topics
        self.limits = limits or BridgeLimits()
        self.retry = RetryPolicy(attempts=10, max_backoff=30.0)  # rides out about a minute of overload or outage
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=broker.client_id)
        if broker.username is not None:
            self.client.username_pw_set(broker.username, broker.password)
        self.client.will_set(topics.status, OFFLINE, qos=QOS, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[bytes]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._announced: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then finish the queued chunks and leave ``offline`` behind."""
        self._loop = asyncio.get_running_loop()
        self.client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive)
        self.client.loop_start()  # paho's network thread; it reconnects by itself
        try:
            await stop.wait()
            self.client.unsubscribe(self.topics.samples)  # so that the queues can run dry
            queues = [queue.join() for queue in self._queues.values()]
            if queues and not await _within(asyncio.gather(*queues), DRAIN_SECONDS):
                log.warning("stopping with chunks still queued")
            offline = self.client.publish(self.topics.status, OFFLINE, qos=QOS, retain=True)
            if self.client.is_connected():
                await asyncio.to_thread(offline.wait_for_publish, DRAIN_SECONDS)
        finally:
            workers = list(self._workers)
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self.client.disconnect()
            self.client.loop_stop()

    @property
    def session_workers(self) -> int:
        """Sessions with a worker (and a queue) now."""
        return len(self._queues)

    # paho's network thread

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: mqtt.ReasonCode, properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.broker.host, self.broker.port, reason)
            return
        log.info("connected to %s:%d", self.broker.host, self.broker.port)
        client.subscribe([(self.topics.samples, QOS), (self.topics.birth, QOS)])
        client.publish(self.topics.status, ONLINE, qos=QOS, retain=True)
        # A broker that restarted without persistence has lost the retained configs.
        self._call(self._announce_all)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("cannot reach the broker at %s:%d; retrying", self.broker.host, self.broker.port)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._call(self._received, message.topic, message.payload)

    def _call(self, callback: Callable[..., object], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    # the asyncio loop

    def _received(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.birth:
            if payload == ONLINE.encode():
                self._announce_all()
            return
        session_id = self.topics.session_of(topic)
        if session_id is None:
            return
        if not SESSION_ID.fullmatch(session_id):
            error = self._describe(InvalidInput(f"topic {topic!r}: session id {session_id!r}: {SESSION_ID_RULE}"))
            self.client.publish(self.topics.rejected, json.dumps(error.body()), qos=QOS)
            return
        queue = self._queues.get(session_id)
        if queue is None:
            if len(self._queues) >= self.limits.max_sessions:
                self._refuse(session_id, f"the bridge carries {self.limits.max_sessions} sessions at most")
                return
            queue = self._queues[session_id] = asyncio.Queue(self.limits.max_queued_chunks)
            worker = asyncio.create_task(self._work(session_id, queue), name=f"mqtt-session-{session_id}")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        if queue.full():
            self._refuse(session_id, f"{self.limits.max_queued_chunks} chunks of this session are queued already")
            return
        queue.put_nowait(payload)

    def _refuse(self, session_id: str, why: str) -> None:
        self._publish(session_id, "error", self._describe(Overloaded(f"chunk not taken: {why}")).body())

    async def _work(self, session_id: str, queue: asyncio.Queue[bytes]) -> None:
        """Process one session's chunks in order; end once it has been idle a while."""
        while True:
            try:
                payload = await asyncio.wait_for(queue.get(), self.limits.idle_seconds)
            except TimeoutError:
                if queue.empty():  # nothing can arrive in between: the loop runs one callback at a time
                    del self._queues[session_id]
                    return
                continue
            try:
                await self._process(session_id, payload)
            except Exception:
                log.exception("chunk of session %s failed", session_id)
                self._publish(
                    session_id, "error", ApiError(500, "internal_error", "the bridge failed on this chunk").body()
                )
            finally:
                queue.task_done()

    async def _process(self, session_id: str, payload: bytes) -> None:
        try:
            chunk = decode_chunk(payload, BodyFormat.JSON, self.services.engine.input_spec)
            response = await self._append(session_id, chunk)
        except (DomainError, StoreUnavailable) as error:
            self._publish(session_id, "error", self._describe(error).body())
            return
        first = session_id not in self._announced
        if first:
            self._announce(session_id)
        for transition in response.transitions:
            body = transition.model_dump(mode="json")
            # Home Assistant's event entity reads the event type from this key.
            self._publish(session_id, "transition", {**body, "event_type": transition.to_activity})
        if first or response.predictions:
            await self._publish_state(session_id)

    def _describe(self, error: DomainError | StoreUnavailable) -> ApiError:
        return describe(error, retry_after=self.services.settings.retry_after_seconds)

    async def _append(self, session_id: str, chunk: Chunk) -> SamplesResponse:
        attempt = 0
        while True:
            try:
                return await self.services.sessions.append(session_id, chunk)
            except (DomainError, StoreUnavailable) as exception:
                error = self._describe(exception)
                retry_after = (error.headers or {}).get("Retry-After")
                wait = self.retry.delay(attempt, float(retry_after or 0)) if error.status == 503 else None
                if wait is None:
                    raise
                log.warning("session %s: %s; retrying in %.1f s", session_id, error.message, wait)
                await asyncio.sleep(wait)
                attempt += 1

    async def _publish_state(self, session_id: str) -> None:
        try:
            state = await self.services.sessions.state(session_id)
        except (DomainError, StoreUnavailable) as error:
            log.warning("session %s: no state to publish: %s", session_id, error)
            return
        body = state.model_dump(mode="json", include={"activity", "confidence", "since", "model", "updated_at"})
        self._publish(session_id, "state", body, retain=True)

    def _announce(self, session_id: str) -> None:
        reference = self.services.engine.reference
        for topic, config in discovery_configs(self.topics, session_id, reference.class_names, reference.version):
            self.client.publish(topic, json.dumps(config), qos=QOS, retain=True)
        self._announced.add(session_id)

    def _announce_all(self) -> None:
        task = asyncio.create_task(self._refresh_announcements(), name="mqtt-announce")
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    async def _refresh_announcements(self) -> None:
        """Announce the sessions still live again; withdraw those that ended or expired, so that Home
        Assistant drops their entities and this bridge stops carrying them."""
        for session_id in sorted(self._announced):
            try:
                live = await self.services.store.get(session_id) is not None
            except StoreUnavailable:
                live = True  # unknown: keep announcing it
            if live:
                self._announce(session_id)
            else:
                self._withdraw(session_id)

    def _withdraw(self, session_id: str) -> None:
        # An empty retained message deletes a retained one: Home Assistant removes the entity.
        for topic in (self.topics.sensor_config(session_id), self.topics.event_config(session_id)):
            self.client.publish(topic, b"", qos=QOS, retain=True)
        self.client.publish(self.topics.session(session_id, "state"), b"", qos=QOS, retain=True)
        self._announced.discard(session_id)

    def _publish(self, session_id: str, leaf: str, body: dict[str, Any], retain: bool = False) -> None:
        self.client.publish(self.topics.session(session_id, leaf), json.dumps(body), qos=QOS, retain=retain)


async def _within(awaitable: Awaitable[object], seconds: float) -> bool:
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        return False
    return True


async def serve(settings: Settings, broker: BrokerConfig, topics: Topics, limits: BridgeLimits) -> None:
    """Load the models, open the store and bridge until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with open_services(settings) as services:
        await MqttBridge(services, broker, topics, limits).run(stop)
