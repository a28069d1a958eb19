"""Describe the served models."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import EngineDep, SettingsDep
from app.openapi import error_responses
from app.schemas import ModalityInfo, ModelInfo, ModelsResponse

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", responses=error_responses())
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelsResponse:
    models = []
    for name, bundle in engine.models.items():
        metrics = {
            key: bundle.metrics[key]
            for key in ("accuracy", "macro_f1", "missing_modality", "held_out_subjects")
            if key in bundle.metrics
        }
        models.append(
            ModelInfo(
                name=name,
                version=bundle.version,
                params=bundle.params,
                window_seconds=bundle.window_seconds,
                modalities=[
                    ModalityInfo(
                        name=spec.name,
                        channels=spec.channels,
                        sample_rate=spec.sample_rate,
                        samples_per_window=bundle.window_samples[spec.name],
                    )
                    for spec in bundle.modalities
                ],
                classes=bundle.class_names,
                metrics=metrics,
            )
        )
    return ModelsResponse(models=models, cascade_threshold=settings.cascade_threshold)
