"""The ceiling for any endpoint of this stack: parse the same body with pydantic, return a constant.

``/v1/predict`` validates a window as a plain FastAPI route would (the request model of
``app.schemas``); the samples route does the same for a session chunk.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.schemas import SamplesChunk, Window

app = FastAPI()


@app.post("/v1/predict")
async def predict(window: Window) -> dict[str, str]:
    return {"activity": "constant"}


@app.post("/v1/sessions/{session_id}/samples")
async def append_samples(session_id: str, chunk: SamplesChunk) -> dict[str, str]:
    return {"session_id": session_id}
