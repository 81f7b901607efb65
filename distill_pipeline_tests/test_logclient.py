"""The teacher logging client: batching, day split, delivery exactly once, back-pressure, exit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from distill_pipeline.core.store import LocalStore, ObjectInfo, ObjectStore, S3Store
from distill_pipeline.logs.client import LogFlushError, LoggerClosed, LogQueueFull, TeacherLogger
from distill_pipeline.logs.schema import LOG_PREFIX, SCHEMA_VERSION, LogRecord

REPO_ROOT = Path(__file__).resolve().parents[1]

# Fast retries so that failure tests take milliseconds.
FAST_RETRY = {"retry_base_delay_s": 0.005, "retry_max_delay_s": 0.02}


def make_record(i: int, timestamp: str | None = None, **fields: object) -> LogRecord:
    record = LogRecord(
        input=f"text {i}",
        model="openai/gpt-4o-mini",
        prompt_template_id="simple_prompt",
        response="0",
        request_id=f"req-{i:07d}",
        **fields,  # type: ignore[arg-type]
    )
    if timestamp is not None:
        record.timestamp = timestamp
    return record


def log_objects(store: ObjectStore) -> list[ObjectInfo]:
    return store.list(f"{LOG_PREFIX}/")


def read_records(store: ObjectStore) -> list[dict[str, object]]:
    records = []
    for info in log_objects(store):
        data = store.get_bytes(info.key)
        assert data.endswith(b"\n")
        records.extend(json.loads(line) for line in data.decode("utf-8").splitlines())
    return records


def request_id_counts(store: ObjectStore) -> Counter[str]:
    return Counter(str(record["request_id"]) for record in read_records(store))


class SlowStore:
    """Delegates to a store; every put first sleeps."""

    def __init__(self, inner: ObjectStore, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.url = inner.url
        self.put_started = threading.Event()

    def put_bytes(self, key: str, data: bytes) -> None:
        self.put_started.set()
        time.sleep(self.delay_s)
        self.inner.put_bytes(key, data)


class FlakyStore:
    """Delegates to a store; puts fail while ``failures_left`` > 0 or while ``down`` is set."""

    def __init__(self, inner: ObjectStore, failures: int = 0) -> None:
        self.inner, self.failures_left, self.down = inner, failures, False
        self.url = inner.url
        self.attempts = 0

    def put_bytes(self, key: str, data: bytes) -> None:
        self.attempts += 1
        if self.down or self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("store unavailable")
        self.inner.put_bytes(key, data)


class GatedStore:
    """Delegates to a store; puts wait until ``gate`` is set."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner, self.gate = inner, threading.Event()
        self.url = inner.url

    def put_bytes(self, key: str, data: bytes) -> None:
        assert self.gate.wait(10), "test never opened the gate"
        self.inner.put_bytes(key, data)


def test_many_threads_every_record_arrives_exactly_once(local_store: LocalStore) -> None:
    threads, per_thread = 8, 1500
    with TeacherLogger(local_store, writer_id="app", max_batch_records=700, flush_interval_s=0.05) as logger:

        def work(t: int) -> None:
            for i in range(per_thread):
                logger.log(make_record(t * per_thread + i))

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        logger.flush(timeout=30)
        stats = logger.stats()

    counts = request_id_counts(local_store)
    assert len(counts) == threads * per_thread
    assert set(counts.values()) == {1}
    assert stats.records_logged == stats.records_written == threads * per_thread
    assert stats.records_queued == 0
    assert stats.objects_written == len(log_objects(local_store))
    assert stats.bytes_written == sum(info.size for info in log_objects(local_store))
    assert stats.write_errors == 0


def test_batches_are_objects_not_requests(local_store: LocalStore) -> None:
    with TeacherLogger(local_store, writer_id="batcher") as logger:
        for i in range(10_000):
            logger.log(make_record(i))
    objects = log_objects(local_store)
    assert 2 <= len(objects) <= 5, [info.key for info in objects]
    assert sum(request_id_counts(local_store).values()) == 10_000
    for info in objects:
        assert info.key.startswith(f"{LOG_PREFIX}/dt=")
        assert info.key.rsplit("/", 1)[1].startswith("batcher-")
        assert info.key.endswith(".jsonl")


def test_batch_byte_limit(local_store: LocalStore) -> None:
    limit = 20_000
    with TeacherLogger(local_store, writer_id="bytes", max_batch_bytes=limit, flush_interval_s=60) as logger:
        for i in range(300):
            logger.log(make_record(i, feedback={"note": "x" * 200}))
    objects = log_objects(local_store)
    assert len(objects) >= 4
    assert all(info.size <= limit for info in objects)
    assert sum(request_id_counts(local_store).values()) == 300


def test_record_larger_than_a_batch_is_written_alone(local_store: LocalStore) -> None:
    with TeacherLogger(local_store, writer_id="big", max_batch_bytes=1000) as logger:
        logger.log(make_record(1, usage={"blob": "y" * 5000}))
        logger.log(make_record(2))
    assert sorted(request_id_counts(local_store)) == ["req-0000001", "req-0000002"]
    assert len(log_objects(local_store)) == 2


def test_batch_straddling_midnight_becomes_two_objects(local_store: LocalStore) -> None:
    timestamps = [
        "2024-03-09T23:59:59.900Z",
        "2024-03-10T00:00:00.100Z",
        "2024-03-10T01:30:00.000+02:00",  # 23:30 UTC on the 9th
        "2024-03-09T23:59:59.999Z",
    ]
    with TeacherLogger(local_store, writer_id="midnight", flush_interval_s=60) as logger:
        for i, timestamp in enumerate(timestamps):
            logger.log(make_record(i, timestamp=timestamp))
    objects = log_objects(local_store)
    assert [info.key.split("/")[1] for info in objects] == ["dt=2024-03-09", "dt=2024-03-10"]
    # one batch: both objects carry the same sequence number
    names = {info.key.rsplit("/", 1)[1].rsplit("-", 1)[0] for info in objects}
    assert names == {"midnight-000000"}
    by_day = {info.key.split("/")[1]: local_store.get_bytes(info.key).decode().splitlines() for info in objects}
    assert [json.loads(line)["request_id"] for line in by_day["dt=2024-03-09"]] == [
        "req-0000000",
        "req-0000002",
        "req-0000003",
    ]
    assert [json.loads(line)["request_id"] for line in by_day["dt=2024-03-10"]] == ["req-0000001"]


def test_flush_interval_writes_without_a_flush(local_store: LocalStore) -> None:
    with TeacherLogger(local_store, writer_id="timer", flush_interval_s=0.1) as logger:
        logger.log(make_record(1))
        deadline = time.monotonic() + 5
        while not log_objects(local_store) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(request_id_counts(local_store)) == ["req-0000001"]


def test_log_returns_fast_while_the_store_is_slow(local_store: LocalStore) -> None:
    slow = SlowStore(local_store, delay_s=0.5)
    with TeacherLogger(slow, writer_id="slow", flush_interval_s=0.01) as logger:
        logger.log(make_record(0))
        assert slow.put_started.wait(5)  # the writer is now inside a put that takes delay_s
        started = time.perf_counter()
        slowest = 0.0
        for i in range(1, 1001):
            before = time.perf_counter()
            logger.log(make_record(i))
            slowest = max(slowest, time.perf_counter() - before)
        elapsed = time.perf_counter() - started
    # Generous bounds for a loaded machine; what matters is that no call waited for the put.
    assert slowest < slow.delay_s / 2, slowest
    assert elapsed < slow.delay_s, elapsed
    assert sum(request_id_counts(local_store).values()) == 1001


def test_store_failing_twice_loses_nothing(local_store: LocalStore) -> None:
    flaky = FlakyStore(local_store, failures=2)
    with TeacherLogger(flaky, writer_id="flaky", max_batch_records=100, **FAST_RETRY) as logger:
        for i in range(1000):
            logger.log(make_record(i))
        logger.flush(timeout=10)
        stats = logger.stats()
    counts = request_id_counts(local_store)
    assert len(counts) == 1000 and set(counts.values()) == {1}
    assert stats.write_errors == 2
    assert stats.records_written == 1000


def test_store_down_keeps_records_queued_and_flush_reports_it(local_store: LocalStore) -> None:
    flaky = FlakyStore(local_store)
    flaky.down = True
    logger = TeacherLogger(flaky, writer_id="down", retries_before_error=3, **FAST_RETRY)
    try:
        for i in range(100):
            logger.log(make_record(i))
        with pytest.raises(LogFlushError, match="100 logged records are not yet written") as raised:
            logger.flush(timeout=10)
        assert isinstance(raised.value.__cause__, ConnectionError)
        stats = logger.stats()
        assert stats.records_queued == 100 and stats.records_written == 0 and stats.write_errors >= 3
        assert log_objects(local_store) == []

        flaky.down = False  # the writer kept retrying; once the store is back it catches up
        logger.flush(timeout=10)
        assert logger.stats().records_queued == 0
    finally:
        logger.close()
    assert sum(request_id_counts(local_store).values()) == 100


def test_full_queue_pushes_back_instead_of_dropping(local_store: LocalStore) -> None:
    gated = GatedStore(local_store)
    logger = TeacherLogger(gated, writer_id="full", max_queue=10, max_batch_records=4, enqueue_timeout_s=0.2)
    try:
        for i in range(10):
            logger.log(make_record(i))
        started = time.monotonic()
        with pytest.raises(LogQueueFull, match="max_queue=10"):
            logger.log(make_record(10))
        assert time.monotonic() - started >= 0.15

        # A blocked caller proceeds as soon as the writer makes room.
        blocked_log_done = threading.Event()

        def log_when_room() -> None:
            logger.log(make_record(11))
            blocked_log_done.set()

        waiter = threading.Thread(target=log_when_room)
        logger.enqueue_timeout_s = 5
        waiter.start()
        assert not blocked_log_done.wait(0.1)
        gated.gate.set()
        waiter.join(5)
        assert blocked_log_done.is_set()
        logger.flush(timeout=5)
    finally:
        gated.gate.set()
        logger.close()
    assert sorted(request_id_counts(local_store)) == [f"req-{i:07d}" for i in (*range(10), 11)]


def test_flush_timeout(local_store: LocalStore) -> None:
    gated = GatedStore(local_store)
    logger = TeacherLogger(gated, writer_id="timeout")
    try:
        logger.log(make_record(1))
        with pytest.raises(TimeoutError, match="1 records unwritten"):
            logger.flush(timeout=0.1)
    finally:
        gated.gate.set()
        logger.close()
    assert list(request_id_counts(local_store)) == ["req-0000001"]


def test_close_flushes_and_is_idempotent(local_store: LocalStore) -> None:
    logger = TeacherLogger(local_store, writer_id="closer", flush_interval_s=60)
    for i in range(25):
        logger.log(make_record(i))
    assert log_objects(local_store) == []
    logger.close()
    logger.close()
    assert not logger._thread.is_alive()
    assert sum(request_id_counts(local_store).values()) == 25
    with pytest.raises(LoggerClosed):
        logger.log(make_record(99))


def test_close_on_a_dead_store_gives_up_and_says_so(local_store: LocalStore) -> None:
    flaky = FlakyStore(local_store)
    flaky.down = True
    logger = TeacherLogger(flaky, writer_id="dead", retries_before_error=2, **FAST_RETRY)
    logger.log(make_record(1))
    with pytest.raises(LogFlushError):
        logger.close()
    assert not logger._thread.is_alive()
    logger.close()  # a second close does not raise again


def test_log_call_builds_the_record(local_store: LocalStore) -> None:
    with TeacherLogger(local_store, writer_id="kw") as logger:
        request_id = logger.log_call(
            input="you are great",
            model="openai/gpt-4o-mini",
            prompt_template_id="simple_prompt",
            response="0",
            user_id="u1",
            task="toxicity",
            params={"temperature": 0},
            usage={"prompt_tokens": 10, "completion_tokens": 1},
            latency_ms=120.5,
            cost_usd=0.0001,
        )
        with pytest.raises(TypeError):
            logger.log_call(input="x", model="m", prompt_template_id="p", response=None, no_such_field=1)
    (record,) = read_records(local_store)
    assert record["request_id"] == request_id
    assert (record["user_id"], record["task"], record["latency_ms"], record["schema_version"]) == (
        "u1",
        "toxicity",
        120.5,
        SCHEMA_VERSION,
    )
    assert record["params"] == {"temperature": 0}


def test_bad_records_fail_in_the_caller(local_store: LocalStore) -> None:
    with TeacherLogger(local_store, writer_id="bad") as logger:
        with pytest.raises(ValueError):
            logger.log(make_record(1, timestamp="yesterday"))
        with pytest.raises(TypeError):
            logger.log(make_record(2, params={"obj": object()}))
        # a record mutated after logging is logged as it was
        record = make_record(3)
        logger.log(record)
        record.response = "changed"
        assert logger.stats().records_logged == 1
    (logged,) = read_records(local_store)
    assert logged["response"] == "0"


@pytest.mark.parametrize("writer_id", ["", "a/b", "../x", "has space", "-leading", "x" * 101, "ok\n"])
def test_writer_id_must_be_key_safe(local_store: LocalStore, writer_id: str) -> None:
    if writer_id == "":
        TeacherLogger(local_store, writer_id=writer_id).close()  # empty means the default
        return
    with pytest.raises(ValueError, match="writer_id"):
        TeacherLogger(local_store, writer_id=writer_id)


def test_default_writer_id_is_key_safe(local_store: LocalStore) -> None:
    with TeacherLogger(local_store) as logger:
        logger.log(make_record(1))
    (info,) = log_objects(local_store)
    assert logger.writer_id in info.key


def test_unclosed_logger_is_flushed_at_interpreter_exit(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        from distill_pipeline.logs.client import TeacherLogger
        from distill_pipeline.logs.schema import LogRecord
        from distill_pipeline.core.store import LocalStore

        logger = TeacherLogger(LocalStore({str(store_dir)!r}), writer_id="exiting", flush_interval_s=600)
        for i in range(3000):
            logger.log(LogRecord(input=str(i), model="m", prompt_template_id="p", response="1", request_id=f"r{{i}}"))
        # no close(), no flush(): the interpreter exits normally right after queueing
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True, timeout=60)
    counts = request_id_counts(LocalStore(store_dir))
    assert len(counts) == 3000 and set(counts.values()) == {1}


def test_s3_store_on_moto_server(s3_store: S3Store) -> None:
    with TeacherLogger(s3_store, writer_id="s3app", max_batch_records=400) as logger:
        for i in range(1000):
            day = "2024-05-01" if i < 500 else "2024-05-02"
            logger.log(make_record(i, timestamp=f"{day}T12:00:00.000Z"))
        logger.flush(timeout=30)
        assert logger.stats().objects_written == len(log_objects(s3_store))
    counts = request_id_counts(s3_store)
    assert len(counts) == 1000 and set(counts.values()) == {1}
    days = {info.key.split("/")[1] for info in log_objects(s3_store)}
    assert days == {"dt=2024-05-01", "dt=2024-05-02"}
    # keys are relative to the store prefix, and the bucket holds them under it
    raw = s3_store.client.list_objects_v2(Bucket=s3_store.bucket, Prefix="some/prefix/logs/")
    assert raw["KeyCount"] == len(log_objects(s3_store))
