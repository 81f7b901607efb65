"""Ingestion: every line in leaves as a kept record or a quarantined line with its reason.

The log objects here are written by hand, line by line, so that each hostile case sits at a
known line of a known object and the quarantine table can be checked row by row.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.store import ObjectStore
from distill_pipeline.data.ingest import DEFAULT_MAX_LINE_BYTES, EXCERPT_CHARS, IngestStats, ingest_objects
from distill_pipeline.logs.schema import MAX_REQUEST_ID_CHARS

DAY = "2026-03-04"


def record(request_id: str, /, **overrides: Any) -> dict[str, Any]:
    """A valid log record; ``overrides`` replace fields, and ``None`` values are written as null."""
    rec: dict[str, Any] = {
        "schema_version": 1,
        "request_id": request_id,
        "timestamp": f"{DAY}T10:00:00.000Z",
        "user_id": "user-1",
        "tenant_id": "forum-web",
        "task": "toxicity",
        "model": "openai/gpt-4",
        "params": {"temperature": 0},
        "prompt_template_id": "simple_prompt",
        "prompt_template_version": "1",
        "input": f"comment of {request_id}",
        "response": '```json\n{"is_bad": 0}\n```',
        "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107},
        "latency_ms": 812.5,
        "cost_usd": 0.00121,
        "error": None,
        "feedback": None,
    }
    rec.update(overrides)
    return rec


def line(request_id: str, /, **overrides: Any) -> str:
    return json.dumps(record(request_id, **overrides), ensure_ascii=False)


def without(request_id: str, name: str) -> str:
    rec = record(request_id)
    del rec[name]
    return json.dumps(rec)


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode("utf-8")


def ingest(
    store: ObjectStore, tmp_path: Path, keys: list[str], name: str = "run", **settings: int
) -> tuple[IngestStats, list, list]:
    """Ingest ``keys``; returns the stats, the kept rows and the quarantined rows (as dicts)."""
    records_path = tmp_path / name / "records.parquet"
    quarantine_path = tmp_path / name / "quarantine.parquet"
    stats = ingest_objects(store, keys, tmp_path / name / "work", records_path, quarantine_path, **settings)
    kept = pq.read_table(records_path).to_pylist()
    quarantined = pq.read_table(quarantine_path).to_pylist()
    assert stats.lines_in == stats.kept + stats.quarantined
    assert stats.kept == len(kept)
    assert stats.quarantined == len(quarantined) == sum(stats.reasons.values())
    for row in quarantined:
        assert row["source_key"] in keys
        assert row["source_line"] is not None
        assert row["reason"]
    return stats, kept, quarantined


def reasons_by_line(quarantined: list[dict[str, Any]], key: str) -> dict[int, str]:
    return {row["source_line"]: row["reason"] for row in quarantined if row["source_key"] == key}


# --- hostile lines -----------------------------------------------------------------------------


def test_hostile_lines_are_quarantined_with_their_line_number_and_reason(local_store, tmp_path):
    key = f"logs/dt={DAY}/hostile.jsonl"
    truncated = line("t-1")[:57]
    # Raw bytes 0xff 0xfe inside a string value: the object is not UTF-8.
    invalid_utf8 = line("bad-utf8", input="caf\udcff\udcfe au lait").encode("utf-8", "surrogateescape")
    lines: list[bytes] = [
        line("ok-1").encode(),  # 1
        truncated.encode(),  # 2
        b"Traceback (most recent call last):",  # 3
        b"[1, 2, 3]",  # 4
        b"",  # 5
        invalid_utf8,  # 6
        b'"just a string"',  # 7
        b"\x00\x00\x00\x00",  # 8
        line("ok-2").encode(),  # 9
        b"   \t ",  # 10
        line("ok-3").encode(),  # 11
    ]
    local_store.put_bytes(key, b"\n".join(lines) + b"\n")

    stats, kept, quarantined = ingest(local_store, tmp_path, [key])

    assert stats.objects == 1
    assert stats.lines_in == 11
    assert [(row["request_id"], row["source_line"]) for row in kept] == [("ok-1", 1), ("ok-2", 9), ("ok-3", 11)]
    assert reasons_by_line(quarantined, key) == {
        2: "not valid JSON",
        3: "not valid JSON",
        4: "not a JSON object",
        5: "blank line",
        6: "invalid UTF-8",
        7: "not a JSON object",
        8: "not valid JSON",
        10: "blank line",
    }
    by_line = {row["source_line"]: row for row in quarantined}
    assert by_line[2]["excerpt"] == truncated
    assert by_line[3]["excerpt"] == "Traceback (most recent call last):"
    # The invalid line's excerpt is printable and says where the bad byte is.
    assert by_line[6]["excerpt"].startswith("byte ")
    assert "\\xff\\xfe" in by_line[6]["excerpt"]
    assert by_line[6]["line_bytes"] == len(invalid_utf8) + 1  # with its newline
    assert stats.reasons == {"not valid JSON": 3, "not a JSON object": 2, "blank line": 2, "invalid UTF-8": 1}


def test_a_huge_line_is_quarantined_for_its_length_with_a_short_excerpt(local_store, tmp_path):
    key = f"logs/dt={DAY}/huge.jsonl"
    # A well-formed record, so only its length can reject it.
    huge = line("huge", input="x" * 10_000_000)
    assert len(huge) > DEFAULT_MAX_LINE_BYTES
    local_store.put_bytes(key, jsonl(line("before"), huge, line("after")))

    stats, kept, quarantined = ingest(local_store, tmp_path, [key])

    assert [(row["request_id"], row["source_line"]) for row in kept] == [("before", 1), ("after", 3)]
    assert len(quarantined) == 1
    row = quarantined[0]
    assert row["source_line"] == 2
    assert row["reason"] == f"line longer than {DEFAULT_MAX_LINE_BYTES} bytes"
    assert row["line_bytes"] == len(huge) + 1
    assert len(row["excerpt"]) <= EXCERPT_CHARS
    assert row["excerpt"] == huge[:EXCERPT_CHARS]
    assert stats.bytes_in > 10_000_000


def test_max_line_bytes_is_a_setting(local_store, tmp_path):
    key = f"logs/dt={DAY}/a.jsonl"
    short, long = line("s"), line("l", input="y" * 500)
    local_store.put_bytes(key, jsonl(short, long))
    records = tmp_path / "r.parquet"
    stats = ingest_objects(
        local_store, [key], tmp_path / "w", records, tmp_path / "q.parquet", max_line_bytes=len(short) + 1
    )
    assert stats.kept == 1
    assert stats.reasons == {f"line longer than {len(short) + 1} bytes": 1}


WRONG_TYPES = [
    # (field, wrong value, reason): one per JSON type the schema knows, and several wrong ones.
    ("request_id", 123, "field request_id must be a string, not integer"),
    ("user_id", 12345, "field user_id must be a string, not integer"),
    ("timestamp", 1704067200, "field timestamp must be a string, not integer"),
    ("input", ["a", "list"], "field input must be a string, not array"),
    ("tenant_id", {"id": 1}, "field tenant_id must be a string, not object"),
    ("response", True, "field response must be a string, not boolean"),
    ("schema_version", "one", "field schema_version must be an integer, not string"),
    ("schema_version", 1.5, "field schema_version must be an integer, not number"),
    ("latency_ms", "fast", "field latency_ms must be a number, not string"),
    ("cost_usd", [0.1], "field cost_usd must be a number, not array"),
    ("params", "temperature=0", "field params must be an object, not string"),
    ("usage", [100, 7], "field usage must be an object, not array"),
    ("feedback", True, "field feedback must be an object, not boolean"),
]
REQUIRED = ("schema_version", "request_id", "timestamp", "user_id", "model", "prompt_template_id", "input")


def test_wrong_types_missing_fields_and_bad_values_are_quarantined(local_store, tmp_path):
    key = f"logs/dt={DAY}/fields.jsonl"
    cases: list[tuple[str, str]] = [
        (line(f"wt-{i}", **{name: value}), reason) for i, (name, value, reason) in enumerate(WRONG_TYPES)
    ]
    cases += [(without(f"miss-{name}", name), f"missing required field {name}") for name in REQUIRED]
    # An explicit null is as missing as an absent key.
    cases += [(line("null-user", user_id=None), "missing required field user_id")]
    cases += [
        (line("v3", schema_version=3), "unsupported schema_version 3"),
        (line("v0", schema_version=0), "unsupported schema_version 0"),
        (line("ts-1", timestamp="yesterday"), "timestamp is not ISO 8601"),
        (line("ts-2", timestamp="2026-13-45T00:00:00Z"), "timestamp is not ISO 8601"),
        (line("ts-3", timestamp=""), "timestamp is not ISO 8601"),
        (line("neither", response=None, error=None), "neither response nor error"),
        (line("bad-served-by", served_by="robot"), "field served_by must be one of teacher, student, not robot"),
        (line("bad-rollout", rollout="blue"), "field rollout must be one of dark, hybrid, canary, full, not blue"),
        (
            line("bad-call-kind", call_kind="x" * 100),
            "field call_kind must be one of teacher, shadow, deferred, student, sample, fallback, not " + "x" * 40,
        ),
        (line("bad-student", student="toxic"), "field student must be an object, not string"),
        (line("  "), "empty request_id"),
        (line("\t\n"), "empty request_id"),
        (line("x" * (MAX_REQUEST_ID_CHARS + 1)), f"request_id longer than {MAX_REQUEST_ID_CHARS} characters"),
        # Whitespace of every kind: tabs and newlines, not just spaces (a regression).
        (line("blank-input", input="  \n\t "), "empty input"),
        (line("ideographic-space", input="\u3000"), "empty input"),
        (line("no-input", input=""), "empty input"),
    ]
    valid = [
        line("ok-error-only", response=None, error="RateLimitError: 429"),
        line("ok-minimal-optional", tenant_id=None, task=None, params=None, usage=None, latency_ms=None),
        line("ok-integer-number", latency_ms=800, cost_usd=0),
        # Version 2: the student answered alone, so there is no teacher response and no error.
        line(
            "ok-student-only",
            schema_version=2,
            response=None,
            error=None,
            served_by="student",
            rollout="full",
            call_kind="student",
            student={"train_id": "abc", "label": 1, "confidence": 0.93, "latency_ms": 4.2},
        ),
        line("ok-soft-label", schema_version=2, label_distribution={"0": 0.25, "1": 0.75}),
        line("x" * MAX_REQUEST_ID_CHARS),
    ]
    local_store.put_bytes(key, jsonl(*valid, *(text for text, _ in cases)))

    stats, kept, quarantined = ingest(local_store, tmp_path, [key])

    assert sorted(row["request_id"] for row in kept) == sorted(json.loads(text)["request_id"] for text in valid)
    expected = {len(valid) + i + 1: reason for i, (_, reason) in enumerate(cases)}
    # DuckDB calls a non-negative JSON integer "ubigint"; either name says "an integer".
    found = {n: reason.replace("not integer", "not integer") for n, reason in reasons_by_line(quarantined, key).items()}
    assert found == expected
    # Where the request id could be read, the quarantine row carries it.
    by_line = {row["source_line"]: row for row in quarantined}
    assert by_line[len(valid) + 1]["request_id"] is None  # request_id was the integer 123
    assert by_line[len(valid) + 2]["request_id"] == "wt-1"
    long_id_row = next(row for row in quarantined if row["reason"].startswith("request_id longer"))
    assert long_id_row["request_id"] == "x" * MAX_REQUEST_ID_CHARS
    assert stats.duplicates == 0
    assert stats.invalid == len(cases)


def test_crlf_line_endings_and_a_missing_final_newline_are_valid(local_store, tmp_path):
    crlf = f"logs/dt={DAY}/crlf.jsonl"
    local_store.put_bytes(crlf, (line("c-1") + "\r\n" + line("c-2") + "\r\n" + "\r\n" + line("c-3") + "\r\n").encode())
    no_newline = f"logs/dt={DAY}/no-newline.jsonl"
    local_store.put_bytes(no_newline, (line("n-1") + "\n" + line("n-2")).encode())
    empty = f"logs/dt={DAY}/empty.jsonl"
    local_store.put_bytes(empty, b"")

    stats, kept, quarantined = ingest(local_store, tmp_path, [crlf, no_newline, empty])

    assert stats.objects == 3
    assert stats.lines_in == 6
    assert [(row["request_id"], row["source_key"], row["source_line"]) for row in kept] == [
        ("c-1", crlf, 1),
        ("c-2", crlf, 2),
        ("c-3", crlf, 4),
        ("n-1", no_newline, 1),
        ("n-2", no_newline, 2),
    ]
    # No carriage return leaks into the values.
    assert all("\r" not in row["input"] and "\r" not in row["response"] for row in kept)
    assert [(row["source_line"], row["reason"]) for row in quarantined] == [(3, "blank line")]


def test_gzip_objects_are_read_and_corrupt_ones_quarantined_whole(local_store, tmp_path):
    good = f"logs/dt={DAY}/a.jsonl.gz"
    local_store.put_bytes(good, gzip.compress(jsonl(line("g-1"), "not json", line("g-2"))))
    truncated = f"logs/dt={DAY}/b.jsonl.gz"
    local_store.put_bytes(truncated, gzip.compress(jsonl(line("t-1"), line("t-2")))[:30])
    not_gzip = f"logs/dt={DAY}/c.jsonl.gz"
    local_store.put_bytes(not_gzip, jsonl(line("p-1")))
    plain = f"logs/dt={DAY}/d.jsonl"
    local_store.put_bytes(plain, jsonl(line("d-1")))

    stats, kept, quarantined = ingest(local_store, tmp_path, [good, truncated, not_gzip, plain])

    assert [(row["request_id"], row["source_key"], row["source_line"]) for row in kept] == [
        ("g-1", good, 1),
        ("g-2", good, 3),
        ("d-1", plain, 1),
    ]
    # A corrupt object cannot be split into lines: it is one quarantined unit, at line 0.
    whole = [row for row in quarantined if row["source_line"] == 0]
    assert sorted(row["source_key"] for row in whole) == [truncated, not_gzip]
    assert all(row["reason"].startswith("object could not be decompressed") for row in whole)
    assert reasons_by_line(quarantined, good) == {2: "not valid JSON"}
    assert stats.lines_in == 3 + 1 + 1 + 1


# --- hostile objects ---------------------------------------------------------------------------


def gzip_of_zeros(size: int) -> bytes:
    """A gzip bomb: ``size`` zero bytes compressed a MiB at a time, about a thousandth of the size."""
    buffer = io.BytesIO()
    zeros = bytes(2**20)
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as bomb:
        for _ in range(size // len(zeros)):
            bomb.write(zeros)
    return buffer.getvalue()


def test_a_gzip_bomb_and_an_oversized_object_are_quarantined_and_the_rest_ingests(local_store, tmp_path):
    cap = 2**19
    bomb = gzip_of_zeros(200 * 2**20)
    assert len(bomb) < 250_000 < cap
    # An object of exactly the cap is read: its last line is padded to make it so.
    head = jsonl(*(line(f"p-{i}") for i in range(19)))
    padding = cap - len(head) - len(jsonl(line("p-19", input="")))
    plain = head + jsonl(line("p-19", input="x" * padding))
    assert len(plain) == cap
    objects = {
        f"logs/dt={DAY}/a-plain.jsonl": plain,
        f"logs/dt={DAY}/b-bomb.jsonl.gz": bomb,
        f"logs/dt={DAY}/c-small.jsonl.gz": gzip.compress(jsonl(line("g-1"), line("g-2"))),
        f"logs/dt={DAY}/d-too-big.jsonl": plain + jsonl(line("one-more")),
        # Under the cap compressed, over it expanded.
        f"logs/dt={DAY}/e-expands.jsonl.gz": gzip.compress(plain + jsonl(line("one-more"))),
    }
    for key, data in objects.items():
        local_store.put_bytes(key, data)

    tracemalloc.start()
    try:
        stats, kept, quarantined = ingest(local_store, tmp_path, sorted(objects), max_object_bytes=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert [row["request_id"] for row in kept] == [f"p-{i}" for i in range(20)] + ["g-1", "g-2"]
    assert [(row["source_key"], row["source_line"], row["reason"]) for row in quarantined] == [
        (f"logs/dt={DAY}/b-bomb.jsonl.gz", 0, f"object larger than {cap} bytes decompressed"),
        (f"logs/dt={DAY}/d-too-big.jsonl", 0, f"object larger than {cap} bytes"),
        (f"logs/dt={DAY}/e-expands.jsonl.gz", 0, f"object larger than {cap} bytes decompressed"),
    ]
    assert stats.objects == len(objects)
    # The bomb was never expanded whole: 200 MB of zeros would show here.
    assert peak < 50 * 2**20


def test_a_gzip_of_several_members_and_padding_still_reads_within_the_cap(local_store, tmp_path):
    # What gzip.decompress accepts: concatenated members, zero padding after the last.
    key = f"logs/dt={DAY}/members.jsonl.gz"
    local_store.put_bytes(key, gzip.compress(jsonl(line("m-1"))) + gzip.compress(jsonl(line("m-2"))) + bytes(8))
    cap = len(jsonl(line("m-1"), line("m-2")))
    _, kept, _ = ingest(local_store, tmp_path, [key], "exact", max_object_bytes=cap)
    assert [row["request_id"] for row in kept] == ["m-1", "m-2"]
    # The cap counts every member: the second one takes the object over it.
    _, kept, quarantined = ingest(local_store, tmp_path, [key], "over", max_object_bytes=cap - 1)
    assert kept == []
    assert [row["reason"] for row in quarantined] == [f"object larger than {cap - 1} bytes decompressed"]


def test_an_s3_key_that_cannot_be_read_safely_is_quarantined_and_the_day_ingests(s3_store, tmp_path):
    good = f"logs/dt={DAY}/a.jsonl"
    s3_store.put_bytes(good, jsonl(line("r-1"), line("r-2")))
    # Written past the store, as any client of the bucket may: the store itself refuses such a key.
    escape = f"logs/dt={DAY}/../../escape.jsonl"
    s3_store.client.put_object(Bucket=s3_store.bucket, Key=f"{s3_store.prefix}/{escape}", Body=jsonl(line("e-1")))
    keys = [info.key for info in s3_store.list(f"logs/dt={DAY}/")]
    assert keys == [escape, good]

    stats, kept, quarantined = ingest(s3_store, tmp_path, keys)

    assert [row["request_id"] for row in kept] == ["r-1", "r-2"]
    assert [(row["source_key"], row["source_line"], row["reason"]) for row in quarantined] == [
        (escape, 0, "object not read: invalid store key")
    ]
    assert (stats.objects, stats.lines_in) == (2, 3)


def test_a_symlinked_object_is_never_read_into_an_excerpt(local_store, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET, not JSON\n")
    good = f"logs/dt={DAY}/a.jsonl"
    local_store.put_bytes(good, jsonl(line("r-1")))
    leak = f"logs/dt={DAY}/leak.jsonl"
    (local_store.root / leak).symlink_to(secret)

    # A listing does not offer it, and a key given by hand is quarantined unread.
    assert [info.key for info in local_store.list(f"logs/dt={DAY}/")] == [good]
    _, kept, quarantined = ingest(local_store, tmp_path, [good, leak])

    assert [row["request_id"] for row in kept] == ["r-1"]
    assert [(row["source_key"], row["source_line"], row["reason"]) for row in quarantined] == [
        (leak, 0, "object not read: store key leads outside the store root through a symlink")
    ]
    assert quarantined[0]["excerpt"] is None


# --- duplicates and replays --------------------------------------------------------------------


def test_duplicate_request_ids_keep_the_first_and_say_where_it_was(local_store, tmp_path):
    first = f"logs/dt={DAY}/a.jsonl"
    second = f"logs/dt={DAY}/b.jsonl"
    local_store.put_bytes(first, jsonl(line("r-1"), line("r-2"), line("r-1", input="a retry, other text"), line("r-3")))
    local_store.put_bytes(second, jsonl(line("r-4"), line("r-2", user_id="someone-else"), line("r-1")))

    # Listing order must not matter: "first" is by object key, then line.
    stats, kept, quarantined = ingest(local_store, tmp_path, [second, first])

    assert [(row["request_id"], row["source_key"], row["source_line"]) for row in kept] == [
        ("r-1", first, 1),
        ("r-2", first, 2),
        ("r-3", first, 4),
        ("r-4", second, 1),
    ]
    assert next(row for row in kept if row["request_id"] == "r-1")["input"] == "comment of r-1"
    dupes = sorted((row["source_key"], row["source_line"], row["request_id"], row["excerpt"]) for row in quarantined)
    assert dupes == [
        (first, 3, "r-1", f"first seen at {first}:1"),
        (second, 2, "r-2", f"first seen at {first}:2"),
        (second, 3, "r-1", f"first seen at {first}:1"),
    ]
    assert all(row["reason"] == "duplicate request_id" for row in quarantined)
    assert stats.duplicates == 3
    assert stats.invalid == 0


def test_a_quarantined_line_does_not_claim_a_request_id(local_store, tmp_path):
    # An invalid first copy is not "first seen": the later valid copy is kept.
    key = f"logs/dt={DAY}/a.jsonl"
    local_store.put_bytes(key, jsonl(line("r-1", latency_ms="slow"), line("r-1")))
    _stats, kept, quarantined = ingest(local_store, tmp_path, [key])
    assert [(row["request_id"], row["source_line"]) for row in kept] == [("r-1", 2)]
    assert [row["reason"] for row in quarantined] == ["field latency_ms must be a number, not string"]


def test_replays_are_idempotent(local_store, tmp_path):
    a = f"logs/dt={DAY}/a.jsonl"
    b = f"logs/dt={DAY}/b.jsonl"
    copy = f"logs/dt={DAY}/z-rewritten.jsonl"
    data_a = jsonl(line("r-1"), "garbage", line("r-2"), line("r-1"))
    local_store.put_bytes(a, data_a)
    local_store.put_bytes(b, jsonl(line("r-3"), line("r-4")))

    _, once, q_once = ingest(local_store, tmp_path, [a, b], "once")
    _, again, q_again = ingest(local_store, tmp_path, [a, b], "again")
    assert [row["request_id"] for row in once] == ["r-1", "r-2", "r-3", "r-4"]
    assert again == once
    assert q_again == q_once

    # The same object listed twice, or written again under a second key: every copy's record is a
    # duplicate, and the kept rows do not change.
    stats, listed_twice, _ = ingest(local_store, tmp_path, [a, b, a], "listed-twice")
    assert listed_twice == once
    assert stats.lines_in == 4 + 2 + 4
    local_store.put_bytes(copy, data_a)
    stats, with_copy, q_copy = ingest(local_store, tmp_path, [a, b, copy], "with-copy")
    assert with_copy == once
    copy_rows = [row for row in q_copy if row["source_key"] == copy]
    assert [(row["source_line"], row["reason"]) for row in copy_rows] == [
        (1, "duplicate request_id"),
        (2, "not valid JSON"),
        (3, "duplicate request_id"),
        (4, "duplicate request_id"),
    ]
    assert stats.kept == 4


# --- typed columns -----------------------------------------------------------------------------


def test_typed_columns(local_store, tmp_path):
    key = f"logs/dt={DAY}/typed.jsonl"
    local_store.put_bytes(
        key,
        jsonl(
            # An offset west of UTC late in the evening is already the next UTC day.
            line("west", timestamp=f"{DAY}T23:30:00.250-02:00", latency_ms=1500, cost_usd=0.5),
            line("zulu", timestamp=f"{DAY}T00:00:01Z", usage={"prompt_tokens": 3, "completion_tokens": 1}),
            line("no-usage", usage=None, latency_ms=None, cost_usd=None),
            line("odd-usage", usage={"prompt_tokens": "many"}),
            line("unicode", input="naïve café 😀 — ok", feedback={"thumbs": "up"}),
        ),
    )

    _, kept, _ = ingest(local_store, tmp_path, [key])
    schema = pq.read_schema(tmp_path / "run" / "records.parquet")
    assert str(schema.field("timestamp").type) == "timestamp[us, tz=UTC]"
    assert str(schema.field("day").type) == "date32[day]"
    for name in ("latency_ms", "cost_usd"):
        assert str(schema.field(name).type) == "double"
    for name in ("prompt_tokens", "completion_tokens", "source_line"):
        assert str(schema.field(name).type) == "int64"

    rows = {row["request_id"]: row for row in kept}
    west = rows["west"]
    assert west["timestamp"] == dt.datetime(2026, 3, 5, 1, 30, 0, 250_000, tzinfo=dt.UTC)
    assert west["day"] == dt.date(2026, 3, 5)
    assert west["latency_ms"] == 1500.0
    assert west["cost_usd"] == 0.5
    assert (west["prompt_tokens"], west["completion_tokens"]) == (100, 7)
    assert json.loads(west["params"]) == {"temperature": 0}
    assert west["schema_version"] == 1
    assert west["task"] == "toxicity"
    assert west["response"] == '```json\n{"is_bad": 0}\n```'
    assert west["error"] is None
    zulu = rows["zulu"]
    assert zulu["timestamp"] == dt.datetime(2026, 3, 4, 0, 0, 1, tzinfo=dt.UTC)
    assert zulu["day"] == dt.date(2026, 3, 4)
    assert (zulu["prompt_tokens"], zulu["completion_tokens"]) == (3, 1)
    no_usage = rows["no-usage"]
    assert (no_usage["prompt_tokens"], no_usage["completion_tokens"]) == (None, None)
    assert (no_usage["latency_ms"], no_usage["cost_usd"]) == (None, None)
    assert rows["odd-usage"]["prompt_tokens"] is None
    assert rows["unicode"]["input"] == "naïve café 😀 — ok"
    assert json.loads(rows["unicode"]["feedback"]) == {"thumbs": "up"}


# --- the S3 store ------------------------------------------------------------------------------


def test_ingest_from_s3_matches_local(s3_store, local_store, tmp_path):
    objects = {
        f"logs/dt={DAY}/a.jsonl": jsonl(line("r-1"), "{truncated", line("r-2"), line("r-1")),
        f"logs/dt={DAY}/b.jsonl.gz": gzip.compress(jsonl(line("r-3"), line("r-4", schema_version=9))),
        f"logs/dt={DAY}/c.jsonl.gz": b"\x1f\x8b corrupt",
    }
    for key, data in objects.items():
        s3_store.put_bytes(key, data)
        local_store.put_bytes(key, data)
    keys = [info.key for info in s3_store.list(f"logs/dt={DAY}/")]
    assert keys == sorted(objects)

    s3_stats, s3_kept, s3_quarantined = ingest(s3_store, tmp_path, keys, "s3")
    local_stats, local_kept, local_quarantined = ingest(local_store, tmp_path, keys, "local")

    assert [row["request_id"] for row in s3_kept] == ["r-1", "r-2", "r-3"]
    assert s3_kept == local_kept
    assert s3_quarantined == local_quarantined
    assert s3_stats == local_stats
    assert s3_stats.reasons["duplicate request_id"] == 1
    assert s3_stats.reasons["unsupported schema_version 9"] == 1
    assert s3_stats.lines_in == 4 + 2 + 1


# --- a realistic mix ---------------------------------------------------------------------------


def test_simulated_faults_are_all_accounted_for(local_store, tmp_path):
    from distill_pipeline.core.task import load_task
    from distill_pipeline.demo.simulator import TrafficProfile, simulate_traffic

    summary = simulate_traffic(
        local_store,
        days=[DAY],
        records_per_day=3000,
        seed=5,
        task=load_task("toxicity"),
        profile=TrafficProfile(malformed_rate=0.05, records_per_object=700),
    )
    stats, kept, _quarantined = ingest(local_store, tmp_path, list(summary.object_keys))
    assert stats.lines_in == summary.lines_written
    assert stats.kept == summary.valid_records
    assert stats.quarantined == sum(summary.malformed.values())
    assert stats.duplicates == summary.malformed["duplicate_request_id"]
    assert stats.reasons.get("invalid UTF-8", 0) == summary.malformed["invalid_utf8"]
    assert len({row["request_id"] for row in kept}) == len(kept)
    assert {row["day"] for row in kept} == {dt.date.fromisoformat(DAY)}


@pytest.mark.parametrize("bad", ["{", '{"schema_version": 1, "request_id": "x"', "}{", "nul\x00l"])
def test_truncated_or_garbled_json_never_raises(local_store, tmp_path, bad):
    key = f"logs/dt={DAY}/a.jsonl"
    local_store.put_bytes(key, jsonl(bad, line("ok")))
    _stats, kept, quarantined = ingest(local_store, tmp_path, [key])
    assert [row["request_id"] for row in kept] == ["ok"]
    assert [(row["source_line"], row["reason"]) for row in quarantined] == [(1, "not valid JSON")]


@pytest.mark.parametrize(
    ("field", "literal"),
    [("latency_ms", "1e400"), ("latency_ms", "-1e400"), ("latency_ms", "NaN"), ("cost_usd", "Infinity")],
)
def test_a_number_that_is_not_finite_is_quarantined_with_its_reason(local_store, tmp_path, field, literal):
    key = f"logs/dt={DAY}/numbers.jsonl"
    # DuckDB's JSON reader takes all four literals (1e400 overflows to inf); json.dumps writes none of them.
    bad = line("not-finite").replace(f'"{field}": {record("x")[field]}', f'"{field}": {literal}')
    assert literal in bad
    local_store.put_bytes(key, jsonl(line("huge-but-finite", latency_ms=1e300), bad))

    stats, kept, quarantined = ingest(local_store, tmp_path, [key])

    assert [row["request_id"] for row in kept] == ["huge-but-finite"] and kept[0]["latency_ms"] == 1e300
    assert reasons_by_line(quarantined, key) == {2: f"field {field} must be a finite number, not {literal}"}
    assert stats.invalid == 1


def test_judging_a_batch_keeps_the_lines_in_order():
    # The records and quarantine tables are written in the order lines were added, without a
    # sort: that holds only while judging a batch is a plan of projections, with no join (an
    # IN list of a few values is planned as one).
    import duckdb

    from distill_pipeline.data.ingest import _BATCH_SCHEMA, _judged_lines_sql

    con = duckdb.connect()
    con.register("batch", _BATCH_SCHEMA.empty_table())
    plan = con.execute(f"EXPLAIN SELECT * FROM ({_judged_lines_sql(DEFAULT_MAX_LINE_BYTES)})").fetchall()[0][1]
    assert "Join" not in plan and "JOIN" not in plan


def test_records_and_quarantine_keep_key_and_line_order(local_store, tmp_path):
    # Twelve objects judged in batches of several (one Arrow chunk each, scanned in parallel),
    # and a corrupt object between them that is quarantined whole.
    keys = []
    for index in range(12):
        key = f"logs/dt={DAY}/obj-{index:02d}.jsonl" + (".gz" if index == 5 else "")
        lines = [line(f"r-{index}-{n}") for n in range(2_000)]
        lines[17] = "{not json"
        local_store.put_bytes(key, b"\x1f\x8b not gzip" if index == 5 else jsonl(*lines))
        keys.append(key)
    _, kept, quarantined = ingest(local_store, tmp_path, keys)
    kept_order = [(row["source_key"], row["source_line"]) for row in kept]
    quarantined_order = [(row["source_key"], row["source_line"]) for row in quarantined]
    assert len(kept) == 11 * 1_999 and kept_order == sorted(kept_order)
    assert len(quarantined) == 11 + 1 and quarantined_order == sorted(quarantined_order)
