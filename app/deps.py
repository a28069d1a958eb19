"""Dependencies injected into routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.engine import InferenceEngine
from app.sessions import SessionService
from app.settings import Settings
from app.store import SessionStore


def _engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


def _sessions(request: Request) -> SessionService:
    return request.app.state.sessions


def _store(request: Request) -> SessionStore:
    return request.app.state.store


def _settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[InferenceEngine, Depends(_engine)]
SessionsDep = Annotated[SessionService, Depends(_sessions)]
StoreDep = Annotated[SessionStore, Depends(_store)]
SettingsDep = Annotated[Settings, Depends(_settings)]
