"""The contract every session store keeps, whatever holds the data.

A session has one stream per modality. ``append`` checks the chunk's ``seq``, appends
raw float32 samples and hands back the samples of every complete window not yet
committed, in one atomic step. The caller classifies them and ``commit``s the
predictions, which records each window once (whichever API process gets there first),
moves the session past them and drops the samples no window still needs. A window
whose classification failed (overload, outage) stays pending, so the client's retry of
the same chunk gets it again: nothing is lost between the two steps. Windows start
every ``hop`` samples and span ``window`` samples; every write refreshes the session's
expiry.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


class StoreUnavailable(Exception):
    """The backing store cannot be reached; nothing was written."""


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


@dataclass
class AppendResult:
    duplicate: bool
    seq: int
    model: str
    layout: StreamLayout
    started: float  # server time (epoch seconds) of the session's first chunk
    received: dict[str, int]  # samples per modality since the session began
    buffered: dict[str, int]  # samples still held
    first_window: int = 0  # index of the first pending window
    windows: int = 0  # pending windows: complete, not committed
    spans: dict[str, bytes] = field(default_factory=dict)  # float32 samples covering the pending windows


@dataclass
class CommitResult:
    recorded: list[int]  # windows whose predictions this commit recorded
    buffered: dict[str, int]  # samples still held afterwards


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
        ttl_seconds: int,
    ) -> AppendResult:
        """Append ``chunk`` (raw float32 per modality) at ``seq``; ``layout``/``model`` apply to a new session.

        Raises ``SeqConflict`` for a gap or an older seq, ``ModalityMismatch`` for a
        modality the session does not stream, ``BufferOverflow`` past ``max_buffer``;
        then nothing is written, not even a new session. A repeat of the last seq
        returns ``duplicate=True``, appends nothing, and still returns pending windows.
        """

    @abc.abstractmethod
    async def commit(
        self, session_id: str, first_window: int, predictions: list[dict], *, keep: int, ttl_seconds: int
    ) -> CommitResult:
        """Record the predictions of windows ``first_window, first_window + 1, ...`` that are not recorded
        yet (keeping the ``keep`` newest); an expired session records nothing."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> SessionSnapshot | None: ...

    @abc.abstractmethod
    async def delete(self, session_id: str) -> bool: ...

    @abc.abstractmethod
    async def active_sessions(self, *, now: float, ttl_seconds: int) -> int: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    async def close(self) -> None:  # noqa: B027 - stores without connections have nothing to close
        pass
