"""Streaming sessions: append chunks, read the current activity, follow its events, read its history, end it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime

from app.decoding import body_format, decode_chunk
from app.deps import EngineDep, SessionsDep
from app.exceptions import InvalidInput
from app.openapi import error_responses, request_body
from app.schemas import SESSION_ID_PATTERN, History, SamplesResponse, SessionState
from app.store import Event, parse_event_id

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SessionId = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="Chosen by the client.")]
# The browser's EventSource sends the header when it reconnects; the query parameter is for a first connect.
LastEventHeader = Annotated[str | None, Header(alias="Last-Event-ID", description="Resume after this event.")]
LastEventQuery = Annotated[str | None, Query(description="Resume after this event (else the Last-Event-ID header).")]
RECONNECT_MS = 1000


@router.post(
    "/{session_id}/samples",
    response_model=SamplesResponse,
    responses=error_responses(409, 413, 415, 422, 503),
    openapi_extra=request_body("chunk"),
)
async def append_samples(session_id: SessionId, request: Request, sessions: SessionsDep, engine: EngineDep) -> Response:
    """A chunk of samples, as JSON or MessagePack; answers the windows it completed."""
    fmt = body_format(request.headers.get("content-type"))
    chunk = decode_chunk(await request.body(), fmt, engine.input_spec)
    answer = await sessions.append(session_id, chunk)
    return Response(answer.model_dump_json(), media_type="application/json")


@router.get("/{session_id}", responses=error_responses(404, 422, 503))
async def get_session(session_id: SessionId, sessions: SessionsDep) -> SessionState:
    return await sessions.state(session_id)


@router.get(
    "/{session_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **error_responses(422, 503)},
)
async def follow_events(
    session_id: SessionId,
    sessions: SessionsDep,
    last_event_id_header: LastEventHeader = None,
    last_event_id: LastEventQuery = None,
) -> StreamingResponse:
    """Server-sent events: ``prediction`` and ``transition`` as they are committed, ``end`` when the session ends.
    A session that has not started yet is waited for (with keep-alives)."""
    resume = last_event_id_header or last_event_id
    if resume is not None:
        try:
            parse_event_id(resume)
        except ValueError as error:
            raise InvalidInput(f"Last-Event-ID: {error}") from error
    events = await sessions.events(session_id, resume)
    return StreamingResponse(
        _server_sent(events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _server_sent(events: AsyncIterator[Event | None]) -> AsyncIterator[str]:
    yield f"retry: {RECONNECT_MS}\n\n"
    async for event in events:
        if event is None:
            yield ": keep-alive\n\n"
        else:  # an event without an id (the end of an expired session's stream) leaves the last id as it was
            yield (f"id: {event.id}\n" if event.id else "") + f"event: {event.type}\ndata: {event.data}\n\n"


@router.get("/{session_id}/history", responses=error_responses(404, 422, 503))
async def get_history(
    session_id: SessionId,
    sessions: SessionsDep,
    since: Annotated[
        AwareDatetime | None, Query(description="Segments ending at or after this time (with zone).")
    ] = None,
    until: Annotated[
        AwareDatetime | None, Query(description="Segments starting at or before this time (with zone).")
    ] = None,
) -> History:
    return await sessions.history(session_id, since, until)


@router.delete("/{session_id}", status_code=204, responses=error_responses(404, 422, 503))
async def end_session(session_id: SessionId, sessions: SessionsDep) -> Response:
    await sessions.delete(session_id)
    return Response(status_code=204)
