"""What the API answers when the session store is full, or does not answer at all."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store.memory import MemoryStore
from tools.redis_cluster import free_node_ports
from tools.traffic import MODALITIES, WatchData

from .service_fixtures import assert_error, memory_settings


def first_chunk(watch_data: WatchData) -> dict:
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    return {"seq": 0, "modalities": {name: samples[name][:60].tolist() for name in MODALITIES}}


def test_a_full_embedded_store_refuses_new_sessions_with_503(watch_data: WatchData) -> None:
    with TestClient(create_app(memory_settings(max_sessions=2, retry_after_seconds=7))) as client:
        for session_id in ("a", "b"):
            assert client.post(f"/v1/sessions/{session_id}/samples", json=first_chunk(watch_data)).status_code == 200
        refused = client.post("/v1/sessions/c/samples", json=first_chunk(watch_data))
        assert_error(refused, 503, "session_limit", mentions=("2 sessions",))
        assert refused.headers["retry-after"] == "7"
        assert client.get("/v1/sessions/c").status_code == 404  # nothing was started
        assert client.delete("/v1/sessions/a").status_code == 204
        assert client.post("/v1/sessions/c/samples", json=first_chunk(watch_data)).status_code == 200


class UnansweringStore(MemoryStore):
    """A store whose every ping waits forever, as a store frozen by a bug would."""

    async def ping(self) -> None:
        await asyncio.Event().wait()


def test_readiness_fails_when_the_store_does_not_answer() -> None:
    with TestClient(create_app(memory_settings())) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.store = UnansweringStore()
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["store"].startswith("no answer within")
        assert client.get("/healthz").status_code == 200


def test_an_unreachable_redis_cluster_answers_503_not_500(watch_data: WatchData) -> None:
    """redis-py's cluster client says that no node answers with an exception of its own: an outage all the same."""
    ports = free_node_ports(2)
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)
    settings = Settings(redis_url=url, redis_prefix="unreachable", compile_models=False)
    with TestClient(create_app(settings)) as client:
        assert_error(client.post("/v1/sessions/a/samples", json=first_chunk(watch_data)), 503, "store_unavailable")
        assert_error(client.get("/v1/sessions/a"), 503, "store_unavailable")
        assert_error(client.get("/v1/overview"), 503, "store_unavailable")
        assert_error(client.get("/v1/sessions/a/events"), 503, "store_unavailable")
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["store"].startswith("unreachable")
