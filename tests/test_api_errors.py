"""The request path's answers to hostile and malformed requests: bounded work, one error shape, ids, no leaks.

Each test here reproduces a reported defect of the request path and fails without its fix.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import msgspec
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from tools.stack import free_port
from tools.traffic import WatchData

from .service_fixtures import assert_error, memory_settings

MAX_BODY_BYTES = 4_000_000


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(memory_settings(max_body_bytes=MAX_BODY_BYTES))) as client:
        yield client


@pytest.fixture(scope="module")
def window(watch_data: WatchData) -> dict[str, list[list[float]]]:
    return watch_data.window(int(watch_data.test[0]))


# --- work bounded per request --------------------------------------------------------------------


def test_flat_list_of_two_million_numbers_is_refused_at_once_with_one_detail(client: TestClient) -> None:
    # Under the body limit, yet each number is a problem: the answer must name the first, not build millions.
    body = b'{"modalities": {"accelerometer": [' + b",".join([b"0"] * 1_990_000) + b"]}}"
    assert len(body) < MAX_BODY_BYTES
    started = time.perf_counter()
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - started
    error = assert_error(response, 422, "invalid_input", mentions=("modalities.accelerometer[0]", "list"))
    assert len(error["details"]) == 1
    assert len(response.content) < 1000
    # A generous bound: the defect took about a minute; parsing 4 MB takes a fraction of a second.
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_many_unknown_modalities_give_one_problem(client: TestClient) -> None:
    modalities = {f"sensor{i}": [[0.0]] for i in range(50_000)}
    response = client.post("/v1/predict", json={"modalities": modalities})
    error = assert_error(response, 422, "invalid_input", mentions=("unknown modality", "sensor0"))
    assert len(response.content) < 1000 and len(error["details"]) <= 1


def test_path_and_query_problems_are_capped_with_a_count_of_the_rest(client: TestClient) -> None:
    response = client.get("/v1/overview", params={"limit": "x", "feed": "y"})
    error = assert_error(response, 422, "invalid_input", mentions=("limit",))
    assert len(error["details"]) == 2


# --- malformed bodies ----------------------------------------------------------------------------


def test_malformed_json_says_where_in_lines_and_columns(client: TestClient) -> None:
    body = '{\n  "modalities": {\n    "accelerometer": [[0.1, 0.2,]]\n  }\n}'
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 422, "invalid_input", mentions=("not valid JSON", "line 3", "column"))
    assert "[1]" not in error["message"]


def test_body_that_is_not_utf8_is_422_in_the_error_shape(client: TestClient) -> None:
    body = b'{"modalities": {"accelerometer": [[0.1, \xff\xfe]]}}'
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_input", mentions=("UTF-8",))


def test_body_of_another_media_type_is_415(client: TestClient, window: dict[str, Any]) -> None:
    response = client.post(
        "/v1/predict", content=json.dumps({"modalities": window}), headers={"content-type": "text/csv"}
    )
    assert_error(response, 415, "unsupported_media_type", mentions=("text/csv", "application/json", "msgpack"))


def test_empty_modality_name_is_refused(client: TestClient, window: dict[str, Any]) -> None:
    response = client.post("/v1/predict", json={"modalities": {"": window["accelerometer"]}})
    assert_error(response, 422, "invalid_input", mentions=("unknown modality", "''"))


@pytest.mark.parametrize("magnitude", [1e20, 3e38, 1e39, -1e7])
def test_samples_far_beyond_any_sensor_are_422_naming_the_row(
    client: TestClient, window: dict[str, Any], magnitude: float
) -> None:
    rows = [list(row) for row in window["gyroscope"]]
    rows[42][2] = magnitude
    response = client.post("/v1/predict", json={"modalities": {**window, "gyroscope": rows}})
    error = assert_error(response, 422, "invalid_input", mentions=("gyroscope", "row 42"))
    assert error["details"] == [{"modality": "gyroscope", "row": 42}]


def test_samples_at_the_bound_give_finite_probabilities(client: TestClient, window: dict[str, Any]) -> None:
    bound = client.app.state.settings.max_sample_magnitude
    for model in ("student", "teacher"):
        extreme = {name: [[bound, -bound, bound]] * len(rows) for name, rows in window.items()}
        response = client.post("/v1/predict", json={"modalities": extreme, "model": model})
        assert response.status_code == 200, response.text
        probabilities = response.json()["probabilities"]
        assert all(np.isfinite(p) and 0 <= p <= 1 for p in probabilities.values())


# --- methods, ids and what answers reveal -------------------------------------------------------


def test_405_lists_every_method_of_the_path(client: TestClient) -> None:
    response = client.put("/v1/sessions/kitchen-1")
    assert_error(response, 405, "method_not_allowed", mentions=("PUT", "DELETE", "GET"))
    assert response.headers["allow"] == "DELETE, GET"


def test_request_id_from_the_client_is_echoed_else_one_is_made(client: TestClient) -> None:
    mine = client.get("/v1/nothing", headers={"x-request-id": "gateway-7f3a.2"})
    assert_error(mine, 404, "not_found")
    assert mine.headers["x-request-id"] == "gateway-7f3a.2" == mine.json()["error"]["request_id"]
    hostile = client.get("/v1/nothing", headers={"x-request-id": "x" * 300})
    assert_error(hostile, 404, "not_found")
    assert hostile.headers["x-request-id"] != "x" * 300
    made = [client.get("/healthz").headers["x-request-id"] for _ in range(2)]
    assert made[0] != made[1] and all(len(value) >= 16 for value in made)


def test_store_outage_reveals_no_address_and_logs_it_under_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    settings = memory_settings(redis_url=f"redis://127.0.0.1:{port}/0")
    with TestClient(create_app(settings)) as client:
        answers = [client.get("/v1/sessions/kitchen-1"), client.get("/readyz")]
    error = assert_error(answers[0], 503, "store_unavailable")
    assert answers[1].status_code == 503 and answers[1].json()["checks"]["store"] == "unreachable"
    for answer in answers:
        assert str(port) not in answer.text and "127.0.0.1" not in answer.text and "Error" not in answer.text
    logged = [record.getMessage() for record in caplog.records if error["request_id"] in record.getMessage()]
    assert logged and str(port) in logged[0]


def _failing_app() -> FastAPI:
    app = create_app(memory_settings())

    @app.get("/v1/failing")
    async def failing() -> None:
        raise KeyError("secret-internal-detail")

    return app


def test_unexpected_error_is_500_in_the_shape_and_keeps_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_failing_app(), port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/v1/failing")
        failed = connection.getresponse()
        body = json.loads(failed.read())
        socket_before = connection.sock
        connection.request("GET", "/healthz")  # the same connection: it was kept alive
        again = connection.getresponse()
        again.read()
        assert connection.sock is socket_before and again.status == 200
        connection.close()
    finally:
        server.should_exit = True
        thread.join(30)
    assert failed.status == 500 and failed.getheader("connection") != "close"
    error = body["error"]
    assert error["code"] == "internal_error" and error["details"] == []
    assert error["request_id"] == failed.getheader("x-request-id") and error["request_id"] in error["message"]
    assert "KeyError" not in error["message"] and "secret" not in error["message"]
    logged = [r for r in caplog.records if error["request_id"] in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "secret-internal-detail" in str(logged[0].exc_info[1])


# --- the OpenAPI document ------------------------------------------------------------------------


def test_openapi_declares_the_error_shape_on_every_route(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            errors = {status: answer for status, answer in operation["responses"].items() if status >= "400"}
            assert "500" in errors, (method, path)
            for answer in errors.values():
                schema = answer["content"]["application/json"]["schema"]
                assert schema in (
                    {"$ref": "#/components/schemas/ErrorResponse"},
                    {"$ref": "#/components/schemas/Health"},
                )
    error_body = document["components"]["schemas"]["ErrorBody"]
    assert set(error_body["required"]) == {"code", "message", "details", "request_id"}


def _resolved(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with the document's components, for a validator that follows ``$ref``."""
    return {**schema, "components": document["components"]}


@pytest.mark.parametrize(
    ("path", "session"),
    [("/v1/predict", False), ("/v1/predict/batch", False), ("/v1/sessions/{session_id}/samples", True)],
)
def test_openapi_examples_are_valid_and_accepted_by_the_served_models(
    client: TestClient, path: str, session: bool
) -> None:
    document = client.get("/openapi.json").json()
    body = document["paths"][path]["post"]["requestBody"]["content"]
    assert "application/msgpack" in body
    example = body["application/json"]["example"]
    jsonschema.validate(example, _resolved(document, body["application/json"]["schema"]))
    url = path.replace("{session_id}", "openapi-example") if session else path
    response = client.post(url, json=example)
    assert response.status_code == 200, response.text


# --- the binary body -----------------------------------------------------------------------------


def _packed(window: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {"shape": [len(rows), len(rows[0])], "data": np.asarray(rows, dtype="<f4").tobytes()}
        for name, rows in window.items()
    }


def test_msgpack_window_and_batch_answer_as_json_does(client: TestClient, window: dict[str, Any]) -> None:
    msgpack = {"content-type": "application/msgpack"}
    for model in ("student", "teacher", "cascade"):
        as_json = client.post("/v1/predict", json={"modalities": window, "model": model}).json()
        body = msgspec.msgpack.encode({"modalities": _packed(window), "model": model})
        as_msgpack = client.post("/v1/predict", content=body, headers=msgpack)
        assert as_msgpack.status_code == 200, as_msgpack.text
        assert as_msgpack.json()["probabilities"] == pytest.approx(as_json["probabilities"], abs=1e-6)
    one = {"gyroscope": window["gyroscope"]}
    body = msgspec.msgpack.encode({"windows": [{"modalities": _packed(window)}, {"modalities": _packed(one)}]})
    batch = client.post("/v1/predict/batch", content=body, headers=msgpack)
    assert [p["modalities_used"] for p in batch.json()["predictions"]] == [sorted(window), ["gyroscope"]]


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        (lambda m: {**m, "accelerometer": {**m["accelerometer"], "shape": [100, 2]}}, ("accelerometer", "3 channels")),
        (lambda m: {**m, "accelerometer": {**m["accelerometer"], "data": b"\0" * 12}}, ("accelerometer", "bytes")),
        (lambda m: {**m, "accelerometer": [[0.0, 0.0, 0.0]]}, ("modalities.accelerometer", "shape")),
        (lambda m: {**m, "magnetometer": m["accelerometer"]}, ("unknown modality", "magnetometer")),
        (
            lambda m: {**m, "gyroscope": {**m["gyroscope"], "data": np.full((100, 3), np.nan, "<f4").tobytes()}},
            ("gyroscope", "row 0"),
        ),
    ],
)
def test_msgpack_window_problems_are_named_as_in_json(
    client: TestClient, window: dict[str, Any], change: Any, mentions: tuple[str, ...]
) -> None:
    body = msgspec.msgpack.encode({"modalities": change(_packed(window))})
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/msgpack"})
    assert_error(response, 422, "invalid_input", mentions=mentions)


def test_msgpack_that_is_not_msgpack_is_422(client: TestClient) -> None:
    response = client.post("/v1/predict", content=b"\xc1\xc1", headers={"content-type": "application/msgpack"})
    assert_error(response, 422, "invalid_input", mentions=("MessagePack",))


def test_one_wording_for_an_unknown_session_whatever_the_method(client: TestClient) -> None:
    read = assert_error(client.get("/v1/sessions/never-seen"), 404, "session_not_found", mentions=("never-seen",))
    ended = assert_error(client.delete("/v1/sessions/never-seen"), 404, "session_not_found")
    history = assert_error(client.get("/v1/sessions/never-seen/history"), 404, "session_not_found")
    assert read["message"] == ended["message"] == history["message"]
