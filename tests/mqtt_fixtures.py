"""The real Mosquitto broker, a test-side MQTT client that records what it sees, and a bridge: the
``dmft mqtt-bridge`` command, or one run in the test's process where a test reads its bookkeeping.

``MQTT_TEST_HOST``/``MQTT_TEST_PORT`` name the broker (default 127.0.0.1:1883). Where it cannot
be reached the tests skip, except on CI (``CI=true``), where that is a failure. Every test
runs under its own topic and discovery prefixes, and the retained messages it leaves behind
are cleared afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from app.mqtt.bridge import BrokerConfig, MqttBridge
from app.mqtt.discovery import Topics
from app.mqtt.limits import BridgeLimits
from app.services import open_services
from app.settings import Settings
from tools.stack import dmft_command

from .redis_fixtures import RedisTarget

MQTT_HOST = os.environ.get("MQTT_TEST_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("MQTT_TEST_PORT", "1883"))
STARTUP_TIMEOUT_S = 60


def require_broker() -> None:
    """Skip (fail on CI) unless an MQTT broker accepts connections."""
    try:
        socket.create_connection((MQTT_HOST, MQTT_PORT), timeout=1.0).close()
    except OSError as error:
        reason = f"no MQTT broker at {MQTT_HOST}:{MQTT_PORT} ({error}); start mosquitto or set MQTT_TEST_HOST"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes

    def json(self) -> Any:
        return json.loads(self.payload)


class Watcher:
    """Subscribes to the test's prefixes, records every message, publishes as a sensor would."""

    def __init__(self, *prefixes: str) -> None:
        self.prefixes = prefixes
        self.messages: list[Message] = []
        self._topics: set[str] = set()  # every topic seen, forgotten or not, to clear its retained message
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda client, *_: client.subscribe([(f"{p}/#", 1) for p in prefixes])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append(Message(message.topic, message.payload))
            self._topics.add(message.topic)
            self._changed.notify_all()

    def __enter__(self) -> Watcher:
        self.client.connect(MQTT_HOST, MQTT_PORT)
        self.client.loop_start()
        assert self._subscribed.wait(10), "no SUBACK from the broker"
        return self

    def __exit__(self, *exc: object) -> None:
        # Retained messages would outlive the test in the broker's persistence.
        for topic in sorted(topic for topic in self._topics if not topic.endswith("/samples")):
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, body: dict[str, Any] | bytes | str) -> None:
        payload = json.dumps(body) if isinstance(body, dict) else body
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def wait_for(self, topic: str, where: Callable[[Message], bool] = lambda _: True, timeout: float = 60) -> Message:
        """The first message on ``topic`` (recorded or still to come) for which ``where`` holds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self.messages:
                    if message.topic == topic and where(message):
                        return message
                left = deadline - time.monotonic()
                assert left > 0, (
                    f"nothing on {topic} within {timeout} s; saw {sorted({m.topic for m in self.messages})}"
                )
                self._changed.wait(left)

    def forget(self) -> None:
        """Drop what was recorded, so that ``wait_for`` sees only what comes next."""
        with self._changed:
            self.messages.clear()


@dataclass
class Bridge:
    prefix: str
    discovery_prefix: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def unique_prefixes() -> tuple[str, str]:
    run = uuid.uuid4().hex[:12]
    return f"dmft-test-{run}", f"ha-test-{run}"


@contextmanager
def running_bridge(tmp_path: Path, redis: RedisTarget, watcher: Watcher) -> Iterator[Bridge]:
    """``dmft mqtt-bridge`` on the test broker and Redis prefix, online when this yields; killed afterwards."""
    prefix, discovery_prefix = watcher.prefixes
    log = tmp_path / f"bridge-{prefix}.log"
    environment = {
        **os.environ,
        "DMFT_COMPILE_MODELS": "false",
        "OMP_NUM_THREADS": "1",
        "DMFT_REDIS_PREFIX": redis.prefix,
    }
    command = [
        *dmft_command(),
        "mqtt-bridge",
        *("--broker-host", MQTT_HOST, "--broker-port", str(MQTT_PORT)),
        *("--topic-prefix", prefix, "--discovery-prefix", discovery_prefix, "--redis-url", redis.url),
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=environment, stdout=output, stderr=subprocess.STDOUT)
    bridge = Bridge(prefix, discovery_prefix, process, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = f"{prefix}/bridge/status"
        while not any(m.topic == status and m.payload == b"online" for m in list(watcher.messages)):
            assert process.poll() is None, f"the bridge exited with {process.returncode}:\n{bridge.output()}"
            assert time.monotonic() < deadline, f"the bridge was not online within {STARTUP_TIMEOUT_S} s"
            time.sleep(0.1)
        yield bridge
    finally:
        # Stopped, not killed: it publishes 'offline' before it exits, so the watcher clears that too.
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def bridge_in_process(settings: Settings, watcher: Watcher, limits: BridgeLimits) -> Iterator[MqttBridge]:
    """An ``MqttBridge`` on the test broker with real services, on an event loop of its own thread,
    online when this yields (its bookkeeping open to the test); stopped afterwards."""
    prefix, discovery_prefix = watcher.prefixes
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started: list[MqttBridge] = []

    async def run() -> None:
        async with open_services(settings) as services:
            bridge = MqttBridge(services, BrokerConfig(MQTT_HOST, MQTT_PORT), Topics(prefix, discovery_prefix), limits)
            started.append(bridge)
            await bridge.run(stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), name="mqtt-bridge")
    thread.start()
    try:
        watcher.wait_for(f"{prefix}/bridge/status", lambda m: m.payload == b"online", timeout=STARTUP_TIMEOUT_S)
        yield started[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()
        loop.close()
