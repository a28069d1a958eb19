"""Dynamic batching: windows queue per model and run through the network together.

A window waits at most ``max_delay`` for others to join its batch (up to
``max_batch_size``); while a forward pass runs in the model's thread, newcomers
queue and form the next batch, so batches grow with load on their own. The queue is
bounded: a full queue refuses new windows at once instead of building a backlog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from app import metrics
from model import Bundle

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The model's queue is full or the worker is shutting down."""


@dataclass
class _Job:
    window: dict[str, np.ndarray]  # modality -> (T, C)
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


class BatchingWorker:
    """Owns one bundle's forward passes; ``await predict(window)`` returns its probabilities ``(K,)``."""

    def __init__(self, bundle: Bundle, *, max_batch_size: int, max_delay_s: float, queue_size: int) -> None:
        self.bundle = bundle
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        # One thread per model: forward passes of one model never overlap, those of
        # teacher and student may.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{bundle.name}")
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._queue_wait = metrics.QUEUE_WAIT.labels(model=bundle.name)
        self._inference_duration = metrics.INFERENCE_DURATION.labels(model=bundle.name)
        self._batch_size = metrics.BATCH_SIZE.labels(model=bundle.name)
        self._queue_depth = metrics.QUEUE_DEPTH.labels(model=bundle.name)
        self._queue_depth.set(0)
        metrics.QUEUE_CAPACITY.labels(model=bundle.name).set(queue_size)

    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.bundle.name}")

    async def stop(self) -> None:
        """Refuse new windows, finish every queued one, then stop."""
        self._accepting = False
        await self.queue.join()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def has_room(self, windows: int) -> bool:
        return self._accepting and self.queue.maxsize - self.queue.qsize() >= windows

    def submit(self, windows: list[dict[str, np.ndarray]]) -> list[asyncio.Future[np.ndarray]]:
        """Queue all windows or none (so a batch request is never half-answered)."""
        if not self.has_room(len(windows)):
            raise Overloaded(f"{self.bundle.name} queue is full" if self._accepting else "shutting down")
        loop = asyncio.get_running_loop()
        jobs = [_Job(window, loop.create_future()) for window in windows]
        for job in jobs:
            self.queue.put_nowait(job)
        self._queue_depth.set(self.queue.qsize())
        return [job.future for job in jobs]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_delay_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            self._queue_depth.set(self.queue.qsize())
            try:
                await self._forward(batch)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _forward(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        for job in batch:
            self._queue_wait.observe(started - job.enqueued)
        # Windows with different modality subsets go through the network separately.
        groups: dict[tuple[str, ...], list[_Job]] = {}
        for job in batch:
            groups.setdefault(tuple(sorted(job.window)), []).append(job)
        loop = asyncio.get_running_loop()
        for names, jobs in groups.items():
            inputs = {name: np.stack([job.window[name] for job in jobs]) for name in names}
            began = time.perf_counter()
            try:
                probabilities = await loop.run_in_executor(self._executor, self.bundle.predict, inputs)
            except Exception as error:  # the futures carry it to their requests
                log.exception("forward pass of %s failed", self.bundle.name)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            self._inference_duration.observe(time.perf_counter() - began)
            self._batch_size.observe(len(jobs))
            for job, row in zip(jobs, probabilities, strict=True):
                if not job.future.done():  # a client that went away cancelled its future
                    job.future.set_result(row)
