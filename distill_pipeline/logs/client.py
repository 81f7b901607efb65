"""The client an application uses to log its teacher LLM calls into the object store.

``TeacherLogger.log`` only serialises the record and appends it to an in-memory queue; a
background daemon thread batches the queue into log objects (one object per UTC day and batch,
never one per request) and writes them with retries. Records leave the queue only once the
object holding them is written, so a store outage delays records but never drops them, and a
full queue pushes back on the caller instead of discarding anything. ``flush`` waits for what
was logged so far, ``close`` (also run at interpreter exit) flushes and stops the thread.

A batch's object keys are fixed before its first write attempt, so a retried write whose first
attempt did land overwrites the same object instead of duplicating its records.

Written by hand rather than with ``logging.handlers.QueueHandler``: the stdlib queue drops
nothing but also never batches by size or day, retries, or pushes back.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Protocol, Self

from distill_pipeline.core.backoff import backoff_delay_s
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.logs.schema import LogRecord, encode_log_object, log_object_key

_log = logging.getLogger(__name__)

MIB = 1 << 20

_WRITER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Loggable(Protocol):
    """What the logger writes: a log record, or any line of a stream of its own (feedback events)."""

    @property
    def day(self) -> str: ...

    def to_json(self) -> str: ...


class LogQueueFull(RuntimeError):
    """``log`` waited ``enqueue_timeout_s`` for room in a full queue; the store is too slow or down."""


class LogFlushError(RuntimeError):
    """Logged records could not be written: the store kept failing. The records are still queued."""


class LoggerClosed(RuntimeError):
    """``log`` was called on a closed ``TeacherLogger``."""


@dataclass(frozen=True)
class LoggerStats:
    """Counters for an application's metrics; all are totals since the logger was created."""

    records_logged: int
    records_written: int
    records_queued: int
    objects_written: int
    bytes_written: int
    write_errors: int


class _Entry(NamedTuple):
    day: str
    line: str
    size: int  # UTF-8 bytes of the line and its newline
    enqueued_at: float  # time.monotonic()


@dataclass
class _Batch:
    """The head of the queue being written; ``objects`` maps key -> lines still to write."""

    records: int
    objects: dict[str, list[str]]


def default_writer_id() -> str:
    """``<host>-<pid>``, reduced to the characters a store key may carry."""
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-._") or "host"
    return f"{host[:60]}-{os.getpid()}"


class TeacherLogger:
    """Logs teacher calls to ``store`` under ``logs/dt=YYYY-MM-DD/`` in batched JSONL objects.

    A batch is written as soon as it holds ``max_batch_records`` records or ``max_batch_bytes``
    bytes, or its oldest record has waited ``flush_interval_s``. Up to ``max_queue`` records may
    wait unwritten; beyond that ``log`` blocks for up to ``enqueue_timeout_s`` and then raises
    :class:`LogQueueFull`. A failed write is retried until it succeeds, with exponential backoff
    and full jitter (``core.backoff``) from ``retry_base_delay_s`` up to ``retry_max_delay_s``, on
    top of the store's own retries (botocore's on S3): those ride out a blip, these an outage.
    Once ``retries_before_error`` attempts in a row have failed, ``flush`` and ``close`` raise
    :class:`LogFlushError`.

    ``object_key`` names an object from its day and a unique name: log objects by default, or
    another stream's (``logs.schema.feedback_object_key`` for feedback events).

    Thread-safe: any number of threads may call ``log`` while one background thread writes.
    Use it as a context manager or call ``close``; an unclosed logger is closed at exit.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        writer_id: str | None = None,
        max_batch_records: int = 5000,
        max_batch_bytes: int = 8 * MIB,
        flush_interval_s: float = 5.0,
        max_queue: int = 100_000,
        enqueue_timeout_s: float = 10.0,
        retry_base_delay_s: float = 0.1,
        retry_max_delay_s: float = 30.0,
        retries_before_error: int = 5,
        object_key: Callable[[str, str], str] = log_object_key,
    ) -> None:
        writer_id = writer_id or default_writer_id()
        if not _WRITER_ID.fullmatch(writer_id):
            raise ValueError(f"writer_id must match {_WRITER_ID.pattern}, got {writer_id!r}")
        if min(max_batch_records, max_batch_bytes, max_queue, retries_before_error) < 1:
            raise ValueError("batch sizes, max_queue and retries_before_error must be positive")
        if flush_interval_s <= 0 or enqueue_timeout_s < 0 or retry_base_delay_s < 0:
            raise ValueError("flush_interval_s must be positive and the delays non-negative")
        self.store = store
        self.writer_id = writer_id
        self.max_batch_records = max_batch_records
        self.max_batch_bytes = max_batch_bytes
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.enqueue_timeout_s = enqueue_timeout_s
        self.retry_base_delay_s = retry_base_delay_s
        self.retry_max_delay_s = retry_max_delay_s
        self.retries_before_error = retries_before_error
        self.object_key = object_key

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # wakes the writer thread
        self._room = threading.Condition(self._lock)  # wakes callers blocked on a full queue
        self._progress = threading.Condition(self._lock)  # wakes flush() waiters
        self._queue: deque[_Entry] = deque()
        self._queued_bytes = 0
        self._flush_target = 0  # flush() wants the first this-many records written
        self._closed = False
        self._stopping = False
        self._failures_in_a_row = 0
        self._last_error: BaseException | None = None  # cleared by the next successful write
        self._retry_now = False  # flush() asks the writer to skip the rest of a backoff
        self._seq = 0

        self._records_logged = 0
        self._records_written = 0  # records whose whole batch is written; the queue's head
        self._objects_written = 0
        self._bytes_written = 0
        self._write_errors = 0

        self._thread = threading.Thread(target=self._run, name=f"teacher-logger-{writer_id}", daemon=True)
        self._thread.start()
        # Daemon threads are frozen at exit after atexit hooks run, so this hook is what turns a
        # clean exit into a flushed one.
        atexit.register(self._close_at_exit)

    # -- the caller's side -------------------------------------------------------------------

    def log(self, record: Loggable) -> None:
        """Queue ``record`` for writing and return; blocks only while the queue is full."""
        # Serialise in the caller: a later mutation of ``record`` cannot leak into the log, and a
        # bad timestamp or unserialisable field fails here, not in the writer thread.
        line = record.to_json()
        entry = _Entry(record.day, line, len(line.encode("utf-8")) + 1, time.monotonic())
        with self._lock:
            if self._closed:
                raise LoggerClosed(f"TeacherLogger {self.writer_id!r} is closed")
            if len(self._queue) >= self.max_queue:
                deadline = time.monotonic() + self.enqueue_timeout_s
                while len(self._queue) >= self.max_queue and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise LogQueueFull(
                            f"{len(self._queue)} records are waiting to be written to {self.store.url} "
                            f"(max_queue={self.max_queue}); last write error: {self._last_error!r}"
                        )
                    self._room.wait(remaining)
                if self._closed:
                    raise LoggerClosed(f"TeacherLogger {self.writer_id!r} is closed")
            was_empty = not self._queue
            self._queue.append(entry)
            self._queued_bytes += entry.size
            self._records_logged += 1
            # Wake the writer only when it has something new to decide: the first record starts
            # the flush-interval clock, a full batch is ready to go.
            if was_empty or len(self._queue) == self.max_batch_records or self._queued_bytes >= self.max_batch_bytes:
                self._work.notify()

    def log_call(
        self,
        *,
        input: str,
        model: str,
        prompt_template_id: str,
        response: str | None,
        **fields: Any,
    ) -> str:
        """Build a :class:`LogRecord` from keywords, log it, and return its ``request_id``."""
        record = LogRecord(input=input, model=model, prompt_template_id=prompt_template_id, response=response, **fields)
        self.log(record)
        return record.request_id

    def flush(self, timeout: float | None = None) -> None:
        """Block until every record logged before this call is written.

        Raises :class:`LogFlushError` when the store has failed ``retries_before_error`` times in
        a row (the records stay queued and the writer keeps retrying), and ``TimeoutError`` when
        ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._records_logged
            if self._records_written >= target:
                return
            self._flush_target = max(self._flush_target, target)
            # A store that was down may be back: try now rather than after the backoff, and
            # judge the store by attempts made after this call, not by old failures.
            self._retry_now = True
            errors_before = self._write_errors
            self._work.notify()
            while self._records_written < target:
                if self._write_errors > errors_before and self._failures_in_a_row >= self.retries_before_error:
                    raise LogFlushError(
                        f"{target - self._records_written} logged records are not yet written to "
                        f"{self.store.url}: {self._last_error!r}"
                    ) from self._last_error
                if not self._thread.is_alive():
                    raise LogFlushError(f"the writer thread of TeacherLogger {self.writer_id!r} has stopped")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"flush timed out with {target - self._records_written} records unwritten "
                        f"(last write error: {self._last_error!r})"
                    )
                self._progress.wait(remaining)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the writer thread. Idempotent; later ``log`` calls raise.

        If the flush fails the thread is stopped anyway and the error is raised: the records
        still queued are lost with this logger.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
        atexit.unregister(self._close_at_exit)
        try:
            self.flush(timeout)
        finally:
            with self._lock:
                self._stopping = True
                lost = len(self._queue)
                self._work.notify_all()
            # A put that hangs past the deadline is abandoned; the thread is a daemon.
            self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if lost:
                _log.error("TeacherLogger %r closed with %d records unwritten", self.writer_id, lost)

    def stats(self) -> LoggerStats:
        with self._lock:
            return LoggerStats(
                records_logged=self._records_logged,
                records_written=self._records_written,
                records_queued=len(self._queue),
                objects_written=self._objects_written,
                bytes_written=self._bytes_written,
                write_errors=self._write_errors,
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception:
            _log.exception("TeacherLogger %r could not flush at exit", self.writer_id)

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._write(batch)
        finally:
            # Should the thread ever die, flush() notices instead of waiting forever.
            with self._lock:
                self._progress.notify_all()

    def _next_batch(self) -> _Batch | None:
        """Wait until a batch is due, then describe the queue's head; None when stopping."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                if self._queue and self._batch_due():
                    break
                wait = None
                if self._queue:
                    wait = self._queue[0].enqueued_at + self.flush_interval_s - time.monotonic()
                self._work.wait(wait)
            lines_by_day: dict[str, list[str]] = {}
            records = size = 0
            for entry in self._queue:
                if records and (records >= self.max_batch_records or size + entry.size > self.max_batch_bytes):
                    break
                lines_by_day.setdefault(entry.day, []).append(entry.line)
                records += 1
                size += entry.size
            seq = self._seq
            self._seq += 1
        objects = {
            self.object_key(day, f"{self.writer_id}-{seq:06d}-{uuid.uuid4().hex[:8]}"): lines
            for day, lines in lines_by_day.items()
        }
        return _Batch(records, objects)

    def _batch_due(self) -> bool:
        return (
            self._closed
            or self._flush_target > self._records_written
            or len(self._queue) >= self.max_batch_records
            or self._queued_bytes >= self.max_batch_bytes
            or time.monotonic() - self._queue[0].enqueued_at >= self.flush_interval_s
        )

    def _write(self, batch: _Batch) -> None:
        """Write every object of ``batch``, retrying until done (or until told to stop)."""
        while batch.objects:
            key, lines = next(iter(batch.objects.items()))
            data = encode_log_object(lines)
            try:
                self.store.put_bytes(key, data)
            except Exception as exc:
                with self._lock:
                    self._write_errors += 1
                    self._failures_in_a_row += 1
                    self._last_error = exc
                    self._retry_now = False
                    self._progress.notify_all()
                    failures = self._failures_in_a_row
                    _log.warning("writing log object %s failed (attempt %d): %r", key, failures, exc)
                    deadline = time.monotonic() + backoff_delay_s(
                        failures - 1, self.retry_base_delay_s, self.retry_max_delay_s
                    )
                    # Wait on the condition so that flush() and close() can cut the backoff short.
                    while not (self._stopping or self._retry_now) and (remaining := deadline - time.monotonic()) > 0:
                        self._work.wait(remaining)
                    if self._stopping:
                        return
                continue
            del batch.objects[key]
            with self._lock:
                self._objects_written += 1
                self._bytes_written += len(data)
                self._failures_in_a_row = 0
                self._last_error = None
        with self._lock:
            for _ in range(batch.records):
                self._queued_bytes -= self._queue.popleft().size
            self._records_written += batch.records
            self._room.notify_all()
            self._progress.notify_all()
