"""Classify windows posted whole: one, or a batch in order."""

from __future__ import annotations

import time

from fastapi import APIRouter

from app import metrics
from app.deps import EngineDep, SettingsDep
from app.engine import Answer, InferenceEngine
from app.errors import ApiError
from app.schemas import BatchRequest, BatchResponse, Prediction, Window

router = APIRouter(prefix="/v1/predict", tags=["predict"])


def _prediction(engine: InferenceEngine, answer: Answer, modalities: list[str], started: float) -> Prediction:
    bundle = engine.bundles[answer.model]
    best = int(answer.probabilities.argmax())
    metrics.PREDICTIONS.labels(model=answer.model, activity=bundle.class_names[best]).inc()
    return Prediction(
        activity=bundle.class_names[best],
        confidence=float(answer.probabilities[best]),
        probabilities={name: float(p) for name, p in zip(bundle.class_names, answer.probabilities, strict=True)},
        model=answer.model,
        model_version=bundle.version,
        modalities_used=modalities,
        latency_ms=(time.perf_counter() - started) * 1000,
    )


@router.post("", responses={422: {}, 503: {}})
async def predict(window: Window, engine: EngineDep) -> Prediction:
    started = time.perf_counter()
    arrays = engine.to_window(window.modalities)
    [answer] = await engine.predict_windows([arrays], window.model)
    return _prediction(engine, answer, sorted(arrays), started)


@router.post("/batch", responses={422: {}, 503: {}})
async def predict_batch(request: BatchRequest, engine: EngineDep, settings: SettingsDep) -> BatchResponse:
    started = time.perf_counter()
    if len(request.windows) > settings.max_batch_windows:
        raise ApiError(
            413, "too_many_windows", f"{len(request.windows)} windows; at most {settings.max_batch_windows} per request"
        )
    arrays = []
    for index, window in enumerate(request.windows):
        try:
            arrays.append(engine.to_window(window.modalities))
        except ApiError as error:
            error.message = f"windows[{index}]: {error.message}"
            raise
    answers = await engine.predict_windows(arrays, request.model)
    return BatchResponse(
        predictions=[
            _prediction(engine, answer, sorted(window), started) for answer, window in zip(answers, arrays, strict=True)
        ]
    )
