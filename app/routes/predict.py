"""Classify windows posted whole: one, or a batch in order.

The body is read and decoded here (``app.decoding``, JSON or MessagePack) rather than by a pydantic
parameter: it becomes float32 arrays once, and the answer is encoded straight to JSON bytes.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from fastapi import APIRouter, Request, Response

from app import metrics
from app.decoding import body_format, decode_batch, decode_window
from app.engine import Answer, InferenceEngine
from app.openapi import error_responses, request_body
from app.schemas import BatchResponse, Prediction
from app.settings import Settings

router = APIRouter(prefix="/v1/predict", tags=["predict"])
JSON_MEDIA_TYPE = "application/json"


def _prediction(engine: InferenceEngine, answer: Answer, modalities: list[str], started: float) -> dict[str, Any]:
    """A ``Prediction``, as plain data for the encoder."""
    model = engine.models[answer.model]
    probabilities = answer.probabilities.tolist()
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    metrics.PREDICTIONS.labels(model=answer.model, activity=model.class_names[best]).inc()
    return {
        "activity": model.class_names[best],
        "confidence": probabilities[best],
        "probabilities": dict(zip(model.class_names, probabilities, strict=True)),
        "model": answer.model,
        "model_version": model.version,
        "modalities_used": modalities,
        "latency_ms": (time.perf_counter() - started) * 1000,
    }


@router.post(
    "",
    response_model=Prediction,
    responses=error_responses(413, 415, 422, 503),
    openapi_extra=request_body("window"),
)
async def predict(request: Request) -> Response:
    """One window of any non-empty subset of the modalities, as JSON or MessagePack."""
    started = time.perf_counter()
    engine: InferenceEngine = request.app.state.engine  # not a dependency: resolving one cost 6 % of a request
    decoded = decode_window(await request.body(), body_format(request.headers.get("content-type")), engine.input_spec)
    [answer] = await engine.predict_windows(decoded.windows, decoded.model)
    prediction = _prediction(engine, answer, sorted(decoded.windows[0]), started)
    return Response(msgspec.json.encode(prediction), media_type=JSON_MEDIA_TYPE)


@router.post(
    "/batch",
    response_model=BatchResponse,
    responses=error_responses(413, 415, 422, 503),
    openapi_extra=request_body("batch"),
)
async def predict_batch(request: Request) -> Response:
    """Windows answered in order; a window's problem names its index."""
    started = time.perf_counter()
    engine: InferenceEngine = request.app.state.engine
    settings: Settings = request.app.state.settings
    fmt = body_format(request.headers.get("content-type"))
    decoded = decode_batch(await request.body(), fmt, engine.input_spec, settings.max_batch_windows)
    answers = await engine.predict_windows(decoded.windows, decoded.model)
    predictions = [
        _prediction(engine, answer, sorted(window), started)
        for answer, window in zip(answers, decoded.windows, strict=True)
    ]
    return Response(msgspec.json.encode({"predictions": predictions}), media_type=JSON_MEDIA_TYPE)
