"""Streaming sessions: append chunks, read the current activity, end the session."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from app.deps import SessionsDep
from app.schemas import SamplesChunk, SamplesResponse, SessionState

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SessionId = Annotated[
    str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$", description="Chosen by the client.")
]


@router.post("/{session_id}/samples", responses={404: {}, 409: {}, 422: {}, 503: {}})
async def append_samples(session_id: SessionId, chunk: SamplesChunk, sessions: SessionsDep) -> SamplesResponse:
    return await sessions.append(session_id, chunk)


@router.get("/{session_id}", responses={404: {}, 503: {}})
async def get_session(session_id: SessionId, sessions: SessionsDep) -> SessionState:
    return await sessions.state(session_id)


@router.delete("/{session_id}", status_code=204, responses={404: {}, 503: {}})
async def end_session(session_id: SessionId, sessions: SessionsDep) -> Response:
    await sessions.delete(session_id)
    return Response(status_code=204)
