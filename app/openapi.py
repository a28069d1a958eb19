"""The OpenAPI document: request bodies the routes decode themselves, error answers, and examples
sized to the served models.

The predict and chunk routes read their bodies with ``app.decoding`` (JSON or MessagePack) instead
of a pydantic parameter, so their bodies are declared here from the models of ``app.schemas``;
every route lists the error shape for the statuses it may answer. Once the models are loaded, the
body examples are full windows of the served models, valid as they stand.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.decoding import InputSpec
from app.schemas import (
    BatchRequest,
    ErrorResponse,
    PackedBatchRequest,
    PackedSamplesChunk,
    PackedWindow,
    SamplesChunk,
    Window,
)

JSON = "application/json"
MSGPACK = "application/msgpack"
REF = "#/components/schemas/{model}"
BODIES: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "window": (Window, PackedWindow),
    "batch": (BatchRequest, PackedBatchRequest),
    "chunk": (SamplesChunk, PackedSamplesChunk),
}
ERROR_DESCRIPTIONS = {
    404: "No such resource (or session).",
    405: "Method not allowed; `Allow` lists those that are.",
    409: "Out-of-order `seq`; `details` holds the expected one.",
    413: "Body or batch over its limit.",
    415: "A body neither JSON nor MessagePack.",
    422: "Invalid input; the message names the field and the problem.",
    500: "Unexpected failure; the log has it under the request id.",
    503: "Overloaded, queue deadline passed, inference restarting or store unreachable; see `Retry-After`.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route: the error shape for each status it may answer, and for a 500."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in (*statuses, 500)}


def request_body(kind: str) -> dict[str, Any]:
    """``openapi_extra`` of a route that decodes a ``kind`` body itself."""
    json_model, packed_model = BODIES[kind]
    return {
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": {"$ref": REF.format(model=json_model.__name__)}},
                MSGPACK: {"schema": {"$ref": REF.format(model=packed_model.__name__)}},
            },
        }
    }


def install_openapi(app: FastAPI) -> None:
    """Build the document once, on first request, with the body models and (when loaded) full examples."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        models = [(model, "validation") for pair in BODIES.values() for model in pair]
        _, definitions = models_json_schema(models, ref_template=REF)
        document.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        engine = getattr(app.state, "engine", None)
        if engine is not None and engine.models:
            _add_examples(document, engine.input_spec)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # FastAPI's documented way to customise the document


def _rows(samples: int, channels: int) -> list[list[float]]:
    """A slow, smooth signal: plausible sensor values, different per channel."""
    return [[round(math.sin(i / 10 + c), 3) for c in range(channels)] for i in range(samples)]


def _add_examples(document: dict[str, Any], spec: InputSpec) -> None:
    window = {name: _rows(spec.window_samples[name], m.channels) for name, m in spec.modalities.items()}
    second = {name: _rows(round(m.sample_rate), m.channels) for name, m in spec.modalities.items()}
    examples = {
        "window": {"modalities": window, "model": "student"},
        "batch": {"windows": [{"modalities": window}], "model": "student"},
        "chunk": {"seq": 0, "modalities": second, "model": "student"},
    }
    schemas = document["components"]["schemas"]
    for kind, (json_model, _) in BODIES.items():
        schemas[json_model.__name__]["examples"] = [examples[kind]]
    for name in ("WindowSamples", "Window", "SamplesChunk"):
        # Only the served modalities are read: a schema-driven client should not invent others.
        schemas[name]["properties"]["modalities"]["propertyNames"] = {"enum": list(spec.modalities)}
    for path in document["paths"].values():
        for operation in path.values():
            body = operation.get("requestBody", {}).get("content", {}).get(JSON)
            if body is not None:
                kind = next(k for k, (m, _) in BODIES.items() if body["schema"]["$ref"].endswith(f"/{m.__name__}"))
                body["example"] = examples[kind]
