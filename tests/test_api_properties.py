"""Property-based test of the public API (hypothesis), on the embedded store and on Redis.

Windows of the right shape whose samples take extreme values (the largest doubles, subnormals, the
sensor bound and just past it, integers far beyond any float), chunks of any length with any ``seq``
in any order and clock timestamps anywhere in the calendar (years 1 to 9999) in every zone, history
bounds likewise, and event ids that are not ids. Whatever is drawn, every answer is a 2xx, a 4xx or a
503, never a 500; an error is in the one error shape (a 503 with ``Retry-After``); a JSON answer holds
no NaN or infinity and matches the response schema that the OpenAPI document gives for its route and
status. ``python -m pytest tests/test_api_properties.py --hypothesis-profile=long`` draws 2,000 examples
per test instead of the default 100.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app.main import create_app
from tools.traffic import MODALITIES, WatchData

from .redis_fixtures import RedisTarget
from .service_fixtures import ERROR_KEYS, WINDOW, memory_settings

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CHANNELS = 3
EXTREMES = [0.0, -0.0, 5e-324, -5e-324, 1e-300, 1e6, -1e6, 1000000.0000000001, 1e20, -3e38, 3.4028235e38, 3.5e38,
            1.7976931348623157e308, -1.7976931348623157e308, 2**63, -(2**63) - 1, 10**30, 10**400]  # fmt: skip
ZONES = st.one_of(
    st.just(UTC),
    st.integers(min_value=-1439, max_value=1439).map(lambda minutes: timezone(timedelta(minutes=minutes))),
    st.timezones(),
)
EDGE_TIMES = ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00-14:00",
              "9999-12-31T23:59:59.999999-23:59", "1970-01-01T00:00:00Z", "1969-12-31T23:59:59.999999Z",
              "2199-12-31T23:59:59Z", "2200-01-01T00:00:00Z", "2024-02-30T00:00:00Z",
              "2024-06-01T12:00:00"]  # fmt: skip
# Samples per chunk: often a whole window (so that windows are classified and timed), else any count.
CHUNK_ROWS = st.one_of(st.just(WINDOW), st.sampled_from([0, 1, WINDOW // 2]), st.integers(0, WINDOW))
VALID_EVENT_ID = re.compile(r"([0-9]+)-([0-9]+)")


@pytest.fixture(scope="module", params=["memory", "redis"])
def client(request: pytest.FixtureRequest) -> Iterator[TestClient]:
    if request.param == "memory":
        app_settings = memory_settings()
    else:
        target: RedisTarget = request.getfixturevalue("module_redis_target")
        app_settings = target.settings()
    with TestClient(create_app(app_settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def openapi(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


@pytest.fixture(scope="module")
def windows(watch_data: WatchData) -> list[dict[str, list[list[float]]]]:
    return [watch_data.window(int(index)) for index in watch_data.test[:8]]


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"{name} in a JSON answer")


def check_answer(response: httpx.Response, openapi: dict[str, Any], path: str, method: str) -> None:
    """A 2xx, 4xx or 503 in the documented shape; a JSON body matches the document's schema for its status."""
    status = response.status_code
    event(f"{method.upper()} {path}: {status}")  # the answers by status, in --hypothesis-show-statistics
    assert status < 500 or status == 503, f"{method} {path}: {status} {response.text[:500]}"
    if status == 204:
        return
    assert response.headers["content-type"] == "application/json", response.headers
    body = json.loads(response.content, parse_constant=_refuse_constant)
    responses = openapi["paths"][path][method]["responses"]
    if status >= 400:
        error = body["error"]
        assert set(error) == ERROR_KEYS and error["request_id"] == response.headers["x-request-id"], body
        if status == 503:
            assert "retry-after" in response.headers, response.headers
    documented = responses.get(str(status))
    assert documented is not None or status >= 400, f"{method} {path}: {status} is not documented"
    schema = documented["content"]["application/json"]["schema"] if documented else {"$ref": ERROR_SCHEMA}
    # The references point into the document's components, carried beside the schema that uses them.
    jsonschema.validate(body, {**schema, "components": openapi["components"]})


ERROR_SCHEMA = "#/components/schemas/ErrorResponse"


def sample_values() -> st.SearchStrategy[float | int]:
    return st.one_of(st.sampled_from(EXTREMES), st.floats(allow_nan=False, allow_infinity=False), st.integers())


@st.composite
def extreme_window(draw: st.DrawFn, windows: list[dict[str, list[list[float]]]], rows: int) -> dict[str, list]:
    """A held-out window (its first ``rows`` samples) in some of the modalities, with some samples replaced by
    extreme values, or a modality filled with one."""
    base = draw(st.sampled_from(windows))
    names = draw(st.lists(st.sampled_from(MODALITIES), min_size=1, max_size=len(MODALITIES), unique=True))
    window: dict[str, list] = {name: [list(row) for row in base[name][:rows]] for name in names}
    if draw(st.booleans()):
        name, value = draw(st.sampled_from(names)), draw(sample_values())
        window[name] = [[value] * CHANNELS for _ in range(rows)]
    if rows:
        for _ in range(draw(st.integers(min_value=0, max_value=4))):
            name = draw(st.sampled_from(names))
            row, channel = draw(st.integers(0, rows - 1)), draw(st.integers(0, CHANNELS - 1))
            window[name][row][channel] = draw(sample_values())
    return window


def timestamps() -> st.SearchStrategy[str]:
    """Times anywhere in the calendar, in any zone, written as ISO 8601; and a few at the edges, some malformed."""
    drawn = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=ZONES)
    return st.one_of(drawn.map(datetime.isoformat), st.sampled_from(EDGE_TIMES))


def seqs(previous: int) -> st.SearchStrategy[int]:
    """Mostly the next ``seq`` (so that sessions start and go on), else the last again or any other, far ones too."""
    near = st.sampled_from([previous, previous + 2, previous - 1, 0])
    following = st.just(previous + 1)
    return st.one_of(following, following, following, near, st.integers(min_value=-1, max_value=2**64))


@FUZZ
@given(data=st.data())
def test_any_valid_shaped_window_is_answered_in_the_documented_shape(
    client: TestClient, openapi: dict[str, Any], windows: list, data: st.DataObject
) -> None:
    model = data.draw(st.sampled_from(["student", "teacher", "cascade"]))
    if data.draw(st.booleans()):
        window = data.draw(extreme_window(windows, WINDOW))
        response = client.post("/v1/predict", json={"modalities": window, "model": model})
        check_answer(response, openapi, "/v1/predict", "post")
    else:
        batch = data.draw(st.lists(extreme_window(windows, WINDOW), min_size=1, max_size=3))
        body = {"windows": [{"modalities": window} for window in batch], "model": model}
        check_answer(client.post("/v1/predict/batch", json=body), openapi, "/v1/predict/batch", "post")


@FUZZ
@given(data=st.data())
def test_any_chunks_in_any_order_with_any_clock_are_answered_in_the_documented_shape(
    client: TestClient, openapi: dict[str, Any], windows: list, data: st.DataObject
) -> None:
    session_id = f"prop-{uuid.uuid4().hex[:12]}"
    samples = f"/v1/sessions/{session_id}/samples"
    previous = -1
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        chunk: dict[str, Any] = {
            "seq": data.draw(seqs(previous)),
            "modalities": data.draw(extreme_window(windows, data.draw(CHUNK_ROWS))),
        }
        if data.draw(st.booleans()):
            chunk["timestamp"] = data.draw(timestamps())
        if data.draw(st.booleans()):
            chunk["model"] = data.draw(st.sampled_from(["student", "teacher", "cascade"]))
        response = client.post(samples, json=chunk)
        check_answer(response, openapi, "/v1/sessions/{session_id}/samples", "post")
        if response.status_code == 200:
            previous = response.json()["seq"]
    check_answer(client.get(f"/v1/sessions/{session_id}"), openapi, "/v1/sessions/{session_id}", "get")
    bounds = {name: data.draw(timestamps()) for name in ("since", "until") if data.draw(st.booleans())}
    history = client.get(f"/v1/sessions/{session_id}/history", params=bounds)
    check_answer(history, openapi, "/v1/sessions/{session_id}/history", "get")
    check_answer(client.get("/v1/overview"), openapi, "/v1/overview", "get")
    check_answer(client.delete(f"/v1/sessions/{session_id}"), openapi, "/v1/sessions/{session_id}", "delete")


def is_event_id(text: str) -> bool:
    """The documented rule: ``<milliseconds>-<sequence>`` in ASCII digits, each part below 2^64."""
    match = VALID_EVENT_ID.fullmatch(text)
    return match is not None and all(int(part) < 2**64 for part in match.groups())


@FUZZ
@given(
    last_event_id=st.one_of(
        st.text(max_size=200),
        st.from_regex(r"[0-9０-９٠-٩]{1,30}-[0-9０-９]{1,30}", fullmatch=True),
        st.integers(min_value=2**64, max_value=2**80).map(lambda big: f"{big}-0"),
    ).filter(lambda text: not is_event_id(text))
)
def test_any_event_id_that_is_not_one_is_refused_before_the_stream(
    client: TestClient, openapi: dict[str, Any], last_event_id: str
) -> None:
    response = client.get("/v1/sessions/prop-events/events", params={"last_event_id": last_event_id})
    check_answer(response, openapi, "/v1/sessions/{session_id}/events", "get")
    assert response.status_code == 422, response.text
