"""Dynamic micro-batching: concurrent requests share one forward pass, and the queue is bounded.

Requests put their texts on a queue and await a future per text. One collector task takes the
first waiting text, gathers more for up to ``max_wait_ms`` or until ``max_batch`` texts, runs one
forward pass in a worker thread (never on the event loop) with the engine current at that moment,
and resolves each future. A model swap therefore falls between two batches: a batch already running
finishes on the engine it started with, and nothing in flight fails.

Admission control: a request whose texts would take the queue past ``max_queue`` is refused at
once with :class:`Overloaded` (the server answers 429 with ``Retry-After``) instead of waiting
without bound.

Written here rather than taken from a serving framework: the one forward pass per batch, the swap
between batches and the refusal with a retry estimate are the whole of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from distill_pipeline.serving.students import Engine, StudentAnswer

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue is full; ``retry_after_s`` estimates when it will have room."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoStudent(RuntimeError):
    """No student is loaded yet (or none passed its smoke test)."""


@dataclass
class _Item:
    text: str
    future: asyncio.Future[StudentAnswer]
    enqueued_at: float


class MicroBatcher:
    """Batches texts from concurrent requests into forward passes of ``engine()``."""

    def __init__(
        self,
        engine: Callable[[], Engine | None],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < max_batch or max_wait_ms < 0:
            raise ValueError("max_batch must be positive, max_queue at least max_batch, max_wait_ms non-negative")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # One forward pass at a time: torch already spreads one pass over the cores.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="student-forward")
        # Seconds per text, smoothed; what the Retry-After estimate divides the queue by.
        self._seconds_per_text = 0.01

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._collect(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(NoStudent("the server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def retry_after_s(self) -> float:
        return max(1.0, math.ceil(len(self._queue) * self._seconds_per_text))

    async def submit(self, texts: Sequence[str]) -> list[StudentAnswer]:
        """The student's answers to ``texts``; :class:`Overloaded` at once if the queue is full."""
        if self._arrived is None:
            raise RuntimeError("the micro-batcher is not started")
        if self.engine() is None:
            raise NoStudent("no student has loaded and passed its smoke test yet")
        if len(self._queue) + len(texts) > self.max_queue:
            raise Overloaded(
                f"the student's queue is full ({len(self._queue)} texts waiting, at most {self.max_queue})",
                self.retry_after_s(),
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(text, loop.create_future(), now) for text in texts]
        self._queue.extend(items)
        self._arrived.set()
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _collect(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # Wait for company only while the batch is not full and the oldest text can still wait.
            deadline = self._queue[0].enqueued_at + self.max_wait_s
            while len(self._queue) < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            # A caller that went away (a client disconnect cancels its request) needs no answer.
            batch = [item for item in batch if not item.future.done()]
            if not batch:
                continue
            engine = self.engine()
            if engine is None:
                for item in batch:
                    item.future.set_exception(NoStudent("no student is loaded"))
                continue
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self._executor, engine.predict, [item.text for item in batch])
            except Exception as exc:
                log.exception("a forward pass of %d texts failed on %s", len(batch), engine.train_id)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            self._seconds_per_text = 0.8 * self._seconds_per_text + 0.2 * elapsed / len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch), elapsed)
            for item, answer in zip(batch, answers, strict=True):
                if not item.future.done():
                    item.future.set_result(answer)
