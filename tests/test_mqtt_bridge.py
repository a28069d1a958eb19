"""``dmft mqtt-bridge`` end to end: a subprocess on the real Mosquitto and the test Redis, fed real watch recordings.

What Home Assistant would see is checked as it would see it: from the broker, by a
separate MQTT client. The HTTP app on the same Redis prefix reads the sessions back.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.mqtt.discovery import Topics
from app.mqtt.limits import BridgeLimits
from app.settings import Settings
from tools.stack import free_port
from tools.traffic import MODALITIES, WatchData

from .mqtt_fixtures import Bridge, Message, Watcher, bridge_in_process, require_broker, running_bridge, unique_prefixes
from .redis_fixtures import RedisTarget
from .service_fixtures import HOP, WINDOW, memory_settings

CHUNK = 50  # one second at 50 Hz
Chunk = dict[str, list[list[float]]]


@pytest.fixture(scope="module")
def watcher() -> Iterator[Watcher]:
    require_broker()
    with Watcher(*unique_prefixes()) as running:
        yield running


@pytest.fixture(scope="module")
def bridge(
    watcher: Watcher, module_redis_target: RedisTarget, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bridge]:
    with running_bridge(tmp_path_factory.mktemp("bridge"), module_redis_target, watcher) as running:
        yield running


def _chunks(watch_data: WatchData, recording: int, count: int | None = None) -> list[Chunk]:
    samples = watch_data.recording_samples(recording)
    length = len(samples["accelerometer"])
    chunks = [{name: a[s : s + CHUNK].tolist() for name, a in samples.items()} for s in range(0, length, CHUNK)]
    return chunks[:count]


def _stream(watcher: Watcher, bridge: Bridge, session_id: str, chunks: list[Chunk], first_seq: int = 0) -> None:
    for seq, chunk in enumerate(chunks, start=first_seq):
        watcher.publish(f"{bridge.prefix}/{session_id}/samples", {"seq": seq, "modalities": chunk})


def _session_over_http(redis: RedisTarget, session_id: str, seq: int) -> dict:
    """The session as the HTTP app on the same Redis sees it, once the bridge has processed ``seq``."""
    with TestClient(create_app(redis.settings())) as http:
        deadline = time.monotonic() + 30
        while True:
            response = http.get(f"/v1/sessions/{session_id}")
            if response.status_code == 200 and response.json()["seq"] >= seq:
                return response.json()
            assert time.monotonic() < deadline, f"the bridge did not process seq {seq}: {response.text}"
            time.sleep(0.1)


def test_chunks_over_mqtt_give_state_transition_and_a_session_shared_with_http(
    bridge: Bridge, watcher: Watcher, watch_data: WatchData, module_redis_target: RedisTarget
) -> None:
    recording = watch_data.held_out_recordings()[0]
    label = watch_data.recording_label(recording)
    chunks = _chunks(watch_data, recording)
    _stream(watcher, bridge, "living-room", chunks)

    transition = watcher.wait_for(f"{bridge.prefix}/living-room/transition").json()
    assert (transition["from"], transition["to"], transition["event_type"]) == ("unknown", label, label)
    assert (transition["session_id"], transition["window"], transition["model"]) == ("living-room", 0, "student")
    state = watcher.wait_for(f"{bridge.prefix}/living-room/state", lambda m: m.json()["activity"] == label).json()
    assert set(state) == {"activity", "confidence", "since", "model", "updated_at"}
    assert state["since"] == transition["time"] and state["confidence"] == pytest.approx(transition["confidence"])

    session = _session_over_http(module_redis_target, "living-room", len(chunks) - 1)
    samples = sum(len(chunk["gyroscope"]) for chunk in chunks)
    assert session["windows"] == (samples - WINDOW) // HOP + 1 and session["activity"] == label
    assert session["received"] == dict.fromkeys(MODALITIES, samples)


def test_a_session_is_announced_to_home_assistant_again_on_its_birth_message_until_it_ends(
    bridge: Bridge, watcher: Watcher, watch_data: WatchData, module_redis_target: RedisTarget
) -> None:
    _stream(watcher, bridge, "hall.1", _chunks(watch_data, watch_data.held_out_recordings()[1], 1))
    node = "dmft_hall_1_e59b34d3"  # readable, plus a digest of the id: "hall.1" and "hall:1" stay apart
    sensor_topic = f"{bridge.discovery_prefix}/sensor/{node}/activity/config"
    event_topic = f"{bridge.discovery_prefix}/event/{node}/transition/config"
    sensor, event = watcher.wait_for(sensor_topic).json(), watcher.wait_for(event_topic).json()
    state = watcher.wait_for(f"{bridge.prefix}/hall.1/state").json()
    assert state["activity"] == "unknown" and state["since"] is None  # no window yet: nothing confirmed

    activities = [*watch_data.class_names, "unknown"]
    status = f"{bridge.prefix}/bridge/status"
    assert sensor["state_topic"] == sensor["json_attributes_topic"] == f"{bridge.prefix}/hall.1/state"
    assert sensor["value_template"] == "{{ value_json.activity }}"
    assert (sensor["device_class"], sensor["options"]) == ("enum", activities)
    assert event["state_topic"] == f"{bridge.prefix}/hall.1/transition" and event["event_types"] == activities
    for config in (sensor, event):
        assert config["availability_topic"] == status
        assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
        assert config["device"]["identifiers"] == [node] and config["device"]["sw_version"]
    assert (sensor["unique_id"], event["unique_id"]) == (f"{node}_activity", f"{node}_transition")

    watcher.forget()
    watcher.publish(f"{bridge.discovery_prefix}/status", "online")  # Home Assistant (re)started
    assert watcher.wait_for(sensor_topic, timeout=10).json() == sensor
    assert watcher.wait_for(event_topic, timeout=10).json() == event

    # The session ends (over HTTP, on the same Redis): at the next birth message its entities are withdrawn.
    with TestClient(create_app(module_redis_target.settings())) as http:
        assert http.delete("/v1/sessions/hall.1").status_code == 204
    watcher.forget()
    watcher.publish(f"{bridge.discovery_prefix}/status", "online")
    for topic in (sensor_topic, event_topic, f"{bridge.prefix}/hall.1/state"):
        assert watcher.wait_for(topic, timeout=10).payload == b"", topic


def test_rejected_chunks_are_published_in_the_error_shape(
    bridge: Bridge, watcher: Watcher, watch_data: WatchData, module_redis_target: RedisTarget
) -> None:
    first, second = _chunks(watch_data, watch_data.held_out_recordings()[2], 2)
    errors = f"{bridge.prefix}/porch/error"
    _stream(watcher, bridge, "porch", [first])
    _stream(watcher, bridge, "porch", [second], first_seq=7)
    conflict = watcher.wait_for(errors).json()["error"]
    assert (conflict["code"], conflict["details"]) == ("seq_conflict", [{"expected_seq": 1}])

    watcher.forget()
    watcher.publish(f"{bridge.prefix}/porch/samples", b'{"seq": 1, "modalities": {"accelerometer": [[1, "x", 2]]}}')
    invalid = watcher.wait_for(errors).json()["error"]
    assert invalid["code"] == "invalid_input" and invalid["message"].startswith("modalities.accelerometer[0][1]: ")
    assert set(invalid) == {"code", "message", "details", "request_id"}

    _stream(watcher, bridge, "porch", [second], first_seq=1)  # the errors left the session as it was
    assert _session_over_http(module_redis_target, "porch", 1)["received"] == dict.fromkeys(MODALITIES, 2 * CHUNK)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_the_bridge_leaves_offline_behind_when_it_stops_or_dies(
    how: signal.Signals, redis_target: RedisTarget, tmp_path: Path
) -> None:
    require_broker()
    with Watcher(*unique_prefixes()) as watcher, running_bridge(tmp_path, redis_target, watcher) as bridge:
        bridge.process.send_signal(how)
        status = watcher.wait_for(f"{bridge.prefix}/bridge/status", lambda m: m.payload == b"offline", timeout=20)
        assert bridge.process.wait(timeout=20) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    assert status.payload == b"offline"
    assert "Traceback" not in bridge.output()


def test_session_ids_that_differ_only_in_unsafe_characters_get_distinct_nodes() -> None:
    nodes = {Topics().node(session_id) for session_id in ("kitchen.1", "kitchen:1", "kitchen_1", "kitchen-1")}
    assert len(nodes) == 4
    assert all(re.fullmatch(r"dmft_kitchen[_-]1_[0-9a-f]{8}", node) for node in nodes)


# ---------- what a topic may cost: a bridge in the test's process, its bookkeeping read directly ----------

TINY = {"seq": 0, "modalities": {"accelerometer": [[0.1, -0.9, 0.2]], "gyroscope": [[0.0, 0.1, 0.0]]}}


def _all_on(watcher: Watcher, topic: str, count: int, timeout: float = 60) -> list[Message]:
    """The first ``count`` messages on ``topic``, once that many arrived."""
    deadline = time.monotonic() + timeout
    while len(found := [m for m in list(watcher.messages) if m.topic == topic]) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} messages on {topic}"
        time.sleep(0.05)
    return found[:count]


@pytest.fixture
def own_watcher() -> Iterator[Watcher]:
    """A watcher of the test's own prefixes (the module's ``watcher`` serves the bridge subprocess)."""
    require_broker()
    with Watcher(*unique_prefixes()) as running:
        yield running


def test_chunks_for_invalid_session_ids_are_rejected_before_anything_is_kept_for_them(own_watcher: Watcher) -> None:
    prefix = own_watcher.prefixes[0]
    with bridge_in_process(memory_settings(), own_watcher, BridgeLimits()) as bridge:
        bogus = ["x" * 129, "ünicode", "semi;colon", *[f"bad id {i}" for i in range(300)]]
        for session_id in bogus:
            own_watcher.publish(f"{prefix}/{session_id}/samples", TINY)
        # A trailing newline, which this broker refuses to carry but others may: handed over as paho would.
        message = mqtt.MQTTMessage(topic=f"{prefix}/kitchen\n/samples".encode())
        message.payload = json.dumps(TINY).encode()
        bridge.client.on_message(bridge.client, None, message)

        rejected = _all_on(own_watcher, f"{prefix}/bridge/rejected", len(bogus) + 1)
        errors = [m.json()["error"] for m in rejected]
        assert {error["code"] for error in errors} == {"invalid_input"}
        (newline,) = [error["message"] for error in errors if "'kitchen\\n'" in error["message"]]
        assert "1 to 128 letters" in newline, newline
        assert bridge.session_workers == 0
    assert not [m.topic for m in own_watcher.messages if m.topic.endswith(("/state", "/error"))]


def test_session_workers_are_capped_and_retire_when_idle(own_watcher: Watcher) -> None:
    prefix = own_watcher.prefixes[0]
    with bridge_in_process(memory_settings(), own_watcher, BridgeLimits(max_sessions=2, idle_seconds=1.0)) as bridge:
        for session_id in ("cap-1", "cap-2", "cap-3"):
            own_watcher.publish(f"{prefix}/{session_id}/samples", TINY)
        refused = own_watcher.wait_for(f"{prefix}/cap-3/error").json()["error"]
        assert refused["code"] == "overloaded" and "2 sessions at most" in refused["message"], refused
        for session_id in ("cap-1", "cap-2"):
            own_watcher.wait_for(f"{prefix}/{session_id}/state")
        assert bridge.session_workers == 2

        deadline = time.monotonic() + 20
        while bridge.session_workers:
            assert time.monotonic() < deadline, f"{bridge.session_workers} idle session workers still there"
            time.sleep(0.1)
        own_watcher.publish(f"{prefix}/cap-3/samples", TINY)  # sent again, as the refusal asked
        assert own_watcher.wait_for(f"{prefix}/cap-3/state").json()["activity"] == "unknown"


def test_a_session_waiting_on_its_store_queues_a_bounded_number_of_chunks(own_watcher: Watcher) -> None:
    prefix = own_watcher.prefixes[0]
    unreachable = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", compile_models=False)
    with bridge_in_process(unreachable, own_watcher, BridgeLimits(max_queued_chunks=2)) as bridge:
        # The first chunk is retried while the store is down; the next two wait behind it; the rest are refused.
        for seq in range(8):
            own_watcher.publish(f"{prefix}/stuck-1/samples", {**TINY, "seq": seq})
        refused = _all_on(own_watcher, f"{prefix}/stuck-1/error", 5)
        for message in refused:
            error = message.json()["error"]
            assert error["code"] == "overloaded" and "2 chunks of this session are queued" in error["message"], error
        assert bridge.session_workers == 1
