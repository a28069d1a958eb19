"""The contract every session store keeps, whatever holds the data.

A session has one stream per modality. ``append`` checks the chunk's ``seq``, appends
raw float32 samples and hands back the samples of every complete window not yet
committed, with the activity tracker's state before them, in one atomic step. The
caller classifies the windows, advances the tracker and ``commit``s both. A commit is
a compare-and-set on the session's next uncommitted window: when another API process
committed some of those windows first, nothing is written and the caller gets the
newer tracker state to redo its step from. So each window is recorded once and the
tracker sees every window once, in order. A window whose classification failed
(overload, outage) stays pending, and the client's retry of the same chunk gets it
again. Windows start every ``hop`` samples and span ``window`` samples; every write
refreshes the session's expiry.

With the predictions, a commit appends the session's events (predictions and
transitions, in order) to its event log, the segments the tracker closed to its
history, and the transitions to the outbox that webhook delivery reads, once it is open:
webhook delivery opens it before its process takes requests, so every process then queues
transitions, whatever its own settings, and none does where no webhooks are configured. The
event log and history expire with the session; the outbox is shared by all sessions.

Event readers wait without holding anything another request needs: a reader is woken by news
of its own session (a commit, the session starting or ending) or when the session expires, and
reads only the events after the id it gives.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field

# Event ids are Redis stream ids: '<milliseconds>-<sequence>', ASCII digits, each part below 2**64.
EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
LAST_ID_PART = 2**64 - 1
FIRST_EVENT_ID = "0-0"  # before every event: no event has it
SHOWN_ID_CHARACTERS = 48  # of a refused id, in the error


def parse_event_id(text: str) -> tuple[int, int]:
    """``'<milliseconds>-<sequence>'`` as a comparable pair; ValueError for anything Redis would not take as a
    stream id, and for its shorthand without a sequence."""
    match = EVENT_ID.fullmatch(text)
    if match is None or max(int(part) for part in match.groups()) > LAST_ID_PART:
        shown = text if len(text) <= SHOWN_ID_CHARACTERS else text[:SHOWN_ID_CHARACTERS] + "..."
        raise ValueError(f"not an event id: {shown!r} (expected <milliseconds>-<sequence>, ASCII digits below 2**64)")
    return int(match.group(1)), int(match.group(2))


class StoreUnavailable(Exception):
    """The backing store cannot be reached; nothing was written."""


class SessionLimitReached(Exception):
    """The store holds as many sessions as it may; a new one can start once others end or expire."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the session store holds its maximum of {limit} sessions")
        self.limit = limit


class SeqConflict(Exception):
    def __init__(self, expected: int) -> None:
        super().__init__(f"expected seq {expected}")
        self.expected = expected


class ModalityMismatch(Exception):
    def __init__(self, session_modalities: list[str], model: str) -> None:
        super().__init__(f"the session streams {', '.join(session_modalities)} to the {model} model")
        self.session_modalities = session_modalities
        self.model = model


class BufferOverflow(Exception):
    def __init__(self, modality: str) -> None:
        super().__init__(f"{modality}: too many samples buffered ahead of the other modalities")
        self.modality = modality


@dataclass(frozen=True)
class StreamLayout:
    """How a session's streams are cut into windows, fixed by its first chunk."""

    modalities: tuple[str, ...]
    channels: tuple[int, ...]
    window: tuple[int, ...]  # samples per window, per modality
    hop: tuple[int, ...]  # samples between window starts, per modality
    max_buffer: tuple[int, ...]  # samples a modality may hold at most

    def bytes_per_sample(self, index: int) -> int:
        return 4 * self.channels[index]

    def to_dict(self) -> dict[str, list]:
        return {
            "modalities": list(self.modalities),
            "channels": list(self.channels),
            "window": list(self.window),
            "hop": list(self.hop),
            "max_buffer": list(self.max_buffer),
        }

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> StreamLayout:
        return cls(**{key: tuple(value) for key, value in data.items()})


@dataclass(frozen=True)
class Retention:
    predictions: int  # newest predictions kept per session
    events: int  # newest events kept per session
    segments: int  # newest closed segments kept per session
    outbox: int  # newest transitions kept for delivery, all sessions together


@dataclass
class AppendResult:
    duplicate: bool
    seq: int
    model: str
    layout: StreamLayout
    started: float  # the session's time origin (epoch seconds): client or server clock at its first sample
    generation: str  # made when the session starts: a session ended and started again under its id differs
    received: dict[str, int]  # samples per modality since the session began
    buffered: dict[str, int]  # samples still held
    first_window: int = 0  # index of the first pending window
    windows: int = 0  # pending windows: complete, not committed
    spans: dict[str, bytes] = field(default_factory=dict)  # float32 samples covering the pending windows
    tracker: dict | None = None  # tracker state before ``first_window`` (None: a new tracker)


@dataclass(frozen=True)
class Event:
    type: str  # 'prediction' or 'transition'
    data: str  # JSON
    id: str = ""  # assigned by the store: '<milliseconds>-<sequence>', increasing per session


@dataclass
class CommitResult:
    recorded: list[int]  # windows whose predictions this commit recorded
    buffered: dict[str, int]  # samples still held afterwards
    event_ids: list[str] = field(default_factory=list)  # of the events this commit appended
    # Set when another process committed first: nothing was written; redo from here.
    stale: bool = False
    next_window: int = 0
    tracker: dict | None = None


@dataclass
class EventBatch:
    events: list[Event]  # of the generation read, oldest first
    generation: str | None  # the session's generation when read; None: no live session (not started, ended, expired)


@dataclass(frozen=True)
class EventPosition:
    generation: str | None  # None: no live session
    last_id: str  # the newest event's id, or FIRST_EVENT_ID


@dataclass(frozen=True)
class OutboxEntry:
    id: str  # '<milliseconds>-<sequence>', the milliseconds of its commit
    session_id: str
    event_id: str
    data: str  # the transition's JSON
    position: str  # where delivery stands once this entry is delivered: for read_outbox and advance_delivery


@dataclass
class SessionSnapshot:
    seq: int
    model: str
    layout: StreamLayout
    started: float
    updated: float
    windows: int  # windows committed so far
    received: dict[str, int]
    buffered: dict[str, int]
    predictions: list[dict]  # newest last
    tracker: dict | None  # None until a window was classified
    generation: str


class SessionStore(abc.ABC):
    @abc.abstractmethod
    async def append(
        self,
        session_id: str,
        *,
        seq: int,
        model: str,
        layout: StreamLayout,
        chunk: dict[str, bytes],
        now: float,
        origin: float,
        ttl_seconds: int,
    ) -> AppendResult:
        """Append ``chunk`` (raw float32 per modality) at ``seq``; ``layout``, ``model`` and the time
        ``origin`` apply to a new session.

        Raises ``SeqConflict`` for a gap or an older seq, ``ModalityMismatch`` for a
        modality the session does not stream, ``BufferOverflow`` past ``max_buffer``, ``SessionLimitReached``
        for a new session when the store is full; then nothing is written, not even a new session. A repeat
        of the last seq returns ``duplicate=True``, appends nothing, and still returns pending windows.
        """

    @abc.abstractmethod
    async def commit(
        self,
        session_id: str,
        first_window: int,
        predictions: list[dict],
        *,
        generation: str,
        tracker: dict,
        events: list[Event],
        segments: list[dict],
        retention: Retention,
        ttl_seconds: int,
    ) -> CommitResult:
        """If ``first_window`` is still the session's next uncommitted window, record the predictions of
        windows ``first_window, first_window + 1, ...`` (all complete), store ``tracker``, append
        ``events`` to the event log (transitions also to the outbox, if open) and ``segments`` to the history;
        else write nothing and return ``stale`` with the current window and tracker. A session that
        expired, ended, or started again since ``append`` handed out ``generation`` records nothing."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> SessionSnapshot | None: ...

    @abc.abstractmethod
    async def get_many(self, session_ids: list[str]) -> list[SessionSnapshot | None]:
        """``get`` of each session, in one round trip where the store has round trips."""

    @abc.abstractmethod
    async def history(self, session_id: str) -> list[dict]:
        """The segments the tracker closed, oldest first (the newest ``retention.segments``)."""

    @abc.abstractmethod
    async def event_position(self, session_id: str) -> EventPosition:
        """The session's generation and the id of its newest event, read together."""

    @abc.abstractmethod
    async def read_events(
        self, session_id: str, after: str, *, generation: str | None, wait_seconds: float
    ) -> EventBatch:
        """The session's retained events after ``after`` (a page of them), as soon as there are any or the session
        is no longer ``generation`` (it started, ended, expired, or started again); after ``wait_seconds`` without
        either, an empty batch. ``after`` must be an event id (ValueError)."""

    @abc.abstractmethod
    async def open_outbox(self) -> None:
        """From now on, commits of every process queue their transitions in the outbox."""

    @abc.abstractmethod
    async def read_outbox(self, after: str, *, limit: int, wait_seconds: float) -> list[OutboxEntry]:
        """Transitions of every session after outbox position ``after`` (an entry's position, or an outbox id:
        the entries committed after its time), oldest first (each session's in the order of its commits),
        waiting for one."""

    @abc.abstractmethod
    async def hold_delivery(self, target: str, owner: str, *, lease_seconds: float, start_after: str) -> str | None:
        """Take or renew ``owner``'s lease on delivering to ``target``; the target's cursor (its position in
        the outbox: past every entry delivered) if held, None when another owner holds it. A target without
        a cursor yet starts after the entries committed until the time of outbox id ``start_after``: not with
        a backlog queued for other targets."""

    @abc.abstractmethod
    async def advance_delivery(self, target: str, owner: str, position: str) -> bool:
        """Move ``target``'s cursor to ``position`` (an entry's) if ``owner`` still holds the lease."""

    @abc.abstractmethod
    async def delete(self, session_id: str) -> bool: ...

    @abc.abstractmethod
    async def active_sessions(self, *, now: float, ttl_seconds: int) -> int: ...

    @abc.abstractmethod
    async def recent_sessions(self, *, now: float, ttl_seconds: int, limit: int) -> list[str]:
        """Ids of the live sessions that were written to last, newest first."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    async def close(self) -> None:  # noqa: B027 - stores without connections have nothing to close
        pass
