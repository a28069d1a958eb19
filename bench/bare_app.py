"""The ceiling for any predict endpoint in this stack: parse the same window body, return a constant."""

from __future__ import annotations

from fastapi import FastAPI

from app.schemas import Window

app = FastAPI()


@app.post("/v1/predict")
async def predict(window: Window) -> dict[str, str]:
    return {"activity": "constant"}
