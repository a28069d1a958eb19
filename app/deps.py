"""Dependencies injected into routes, as ``Annotated`` aliases.

They are ``async``: FastAPI runs a plain ``def`` dependency in a thread pool, a thread hop
per request that cost the predict route most of its throughput.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.engine import InferenceEngine
from app.sessions import SessionService
from app.settings import Settings
from app.store import SessionStore


async def _engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


async def _sessions(request: Request) -> SessionService:
    return request.app.state.sessions


async def _store(request: Request) -> SessionStore:
    return request.app.state.store


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[InferenceEngine, Depends(_engine)]
SessionsDep = Annotated[SessionService, Depends(_sessions)]
StoreDep = Annotated[SessionStore, Depends(_store)]
SettingsDep = Annotated[Settings, Depends(_settings)]
