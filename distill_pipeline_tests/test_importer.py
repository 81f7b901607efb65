"""The importer: real teacher answers, CSV and JSONL sources, skipped rows, bad mappings."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import load_task
from distill_pipeline.logs.importer import (
    ColumnMapping,
    ImportMappingError,
    import_table,
    jigsaw_mapping,
    object_payloads,
)
from distill_pipeline.logs.schema import LOG_PREFIX, SCHEMA_FIELDS, encode_log_object
from distill_pipeline_tests.conftest import JIGSAW_TEACHER_RESPONSES as TEACHER_RESPONSES
from distill_pipeline_tests.conftest import requires_shared_jigsaw

JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "object": (dict,)}


def read_records(store: LocalStore, keys: tuple[str, ...] | list[str]) -> list[dict]:
    return [json.loads(line) for key in keys for line in store.get_bytes(key).decode("utf-8").splitlines()]


def all_objects(store: LocalStore) -> dict[str, bytes]:
    return {info.key: store.get_bytes(info.key) for info in store.list(f"{LOG_PREFIX}/")}


def assert_schema(record: dict) -> None:
    assert set(record) == {spec.name for spec in SCHEMA_FIELDS}
    for spec in SCHEMA_FIELDS:
        value = record[spec.name]
        if spec.required:
            assert value is not None, spec.name
        if value is not None:
            assert isinstance(value, JSON_TYPES[spec.json_type]) and not isinstance(value, bool), spec.name


@requires_shared_jigsaw
def test_real_teacher_responses_import_completely_and_idempotently(tmp_path: Path) -> None:
    task = load_task("toxicity")
    source = pq.read_table(TEACHER_RESPONSES)
    store = LocalStore(tmp_path / "store")

    summary = import_table(store, TEACHER_RESPONSES, jigsaw_mapping(), default_day="2024-01-15", task=task)

    assert summary.rows_read == source.num_rows == 8170
    assert summary.rows_written + summary.rows_skipped == summary.rows_read
    assert summary.skipped == {}  # one row per distinct (id, model, prompt, response); no nulls
    assert summary.rows_per_day == {"2024-01-15": 8170}
    records = read_records(store, summary.object_keys)
    assert len(records) == summary.rows_written
    assert len({r["request_id"] for r in records}) == len(records)
    for record in records:
        assert_schema(record)
    assert {r["model"] for r in records} == {"openai/gpt-4-1106-preview", "openai/gpt-3.5-turbo"}
    assert {r["prompt_template_id"] for r in records} == {"simple_prompt", "cot_prompt"}
    assert {r["prompt_template_version"] for r in records} == {"1"}
    assert {r["task"] for r in records} == {"toxicity"}
    assert {json.dumps(r["params"]) for r in records} == {'{"temperature": 0.0}', "{}"}  # null temperature left out
    # Row order and text survive byte for byte.
    assert [r["input"] for r in records] == source.column("comment_text").to_pylist()
    assert [r["response"] for r in records] == source.column("raw_response").to_pylist()

    first = all_objects(store)
    again = import_table(store, TEACHER_RESPONSES, jigsaw_mapping(), default_day="2024-01-15", task=task)
    assert again.object_keys == summary.object_keys
    assert all_objects(store) == first


def test_csv_source_with_constants_row_hash_ids_and_skips(tmp_path: Path) -> None:
    csv_path = tmp_path / "support export.csv"
    csv_path.write_text(
        "text,answer,when,who\n"
        '"You are a clown, ""friend""",true,2024-05-01T10:00:00Z,0012\n'
        '"multi\nline ünïcode 🙂",false,2024-05-01 23:30:00+02:00,0013\n'
        ",false,2024-05-02T08:00:00Z,0014\n"
        "late reply,false,2024-05-02T09:15:30.250Z,\n"
        "late reply,false,2024-05-02T09:15:30.250Z,\n"
        "bad clock,false,yesterday-ish,0015\n"
        "NA,null,2024-05-02T10:00:00Z,0016\n",
        encoding="utf-8",
    )
    mapping = ColumnMapping(
        input="text",
        response="answer",
        timestamp="when",
        user_id="who",
        constants={
            "model": "openai/gpt-4-1106-preview",
            "prompt_template_id": "simple_prompt",
            "params": {"temperature": 0},
        },
    )
    store = LocalStore(tmp_path / "store")

    summary = import_table(store, csv_path, mapping)

    assert summary.rows_read == 7
    assert summary.skipped == {"null_input": 1, "duplicate_row": 1, "unparseable_timestamp": 1}
    assert summary.skipped_examples == {"null_input": [2], "duplicate_row": [4], "unparseable_timestamp": [5]}
    assert summary.rows_written == 4
    assert summary.rows_per_day == {"2024-05-01": 2, "2024-05-02": 2}
    assert [key.rsplit("/", 1)[1] for key in summary.object_keys] == [
        f"import-support_export-{summary.source_sha256[:8]}-00000.jsonl"
    ] * 2
    records = read_records(store, summary.object_keys)
    for record in records:
        assert_schema(record)
    assert [r["input"] for r in records] == ['You are a clown, "friend"', "multi\nline ünïcode 🙂", "late reply", "NA"]
    assert records[-1]["response"] == "null"  # only empty cells are null
    assert [r["timestamp"] for r in records] == [
        "2024-05-01T10:00:00.000Z",
        "2024-05-01T21:30:00.000Z",
        "2024-05-02T09:15:30.250Z",
        "2024-05-02T10:00:00.000Z",
    ]
    assert [r["user_id"] for r in records] == ["0012", "0013", "anonymous", "0016"]  # text kept; no user -> default
    assert {r["model"] for r in records} == {"openai/gpt-4-1106-preview"}
    assert {json.dumps(r["params"]) for r in records} == {'{"temperature": 0}'}
    assert records[0]["task"] is None and records[0]["prompt_template_version"] is None  # no task given

    first = all_objects(store)
    assert import_table(store, csv_path, mapping).object_keys == summary.object_keys
    assert all_objects(store) == first


def test_jsonl_source_with_request_ids_usage_and_errors(tmp_path: Path) -> None:
    rows = [
        {
            "id": "r1",
            "ts": "2024-06-01T00:00:01Z",
            "q": "nice post",
            "a": '```json\n{"is_bad": 0}\n```',
            "err": None,
            "pt": 50,
            "ct": 9,
            "ms": 512.5,
            "usd": 0.0008,
            "prompt": "simple_prompt",
        },
        {
            "id": "r2",
            "ts": "2024-06-01T00:00:02Z",
            "q": "you muppet",
            "a": None,
            "err": "RateLimitError: 429",
            "pt": None,
            "ct": None,
            "ms": 80.0,
            "usd": 0.0,
            "prompt": "simple_prompt",
        },
        {
            "id": "r1",
            "ts": "2024-06-01T00:00:03Z",
            "q": "retry of r1",
            "a": "0",
            "err": None,
            "pt": 50,
            "ct": 1,
            "ms": 300.0,
            "usd": 0.0005,
            "prompt": "simple_prompt",
        },
        {
            "id": "r3",
            "ts": "2024-06-01T00:00:04Z",
            "q": None,
            "a": "1",
            "err": None,
            "pt": 50,
            "ct": 1,
            "ms": 300.0,
            "usd": 0.0005,
            "prompt": "simple_prompt",
        },
        {
            "id": "r4",
            "ts": "2024-06-01T00:00:05Z",
            "q": "which prompt?",
            "a": "1",
            "err": None,
            "pt": 50,
            "ct": 1,
            "ms": 300.0,
            "usd": 0.0005,
            "prompt": None,
        },
    ]
    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    mapping = ColumnMapping(
        input="q",
        response="a",
        request_id="id",
        timestamp="ts",
        error="err",
        latency_ms="ms",
        cost_usd="usd",
        prompt_template_id="prompt",
        usage={"prompt_tokens": "pt", "completion_tokens": "ct"},
        constants={"model": "openai/gpt-4o", "user_id": "app-1"},
    )
    store = LocalStore(tmp_path / "store")

    summary = import_table(store, path, mapping, task=load_task("toxicity"))

    assert summary.skipped == {"duplicate_request_id": 1, "null_input": 1, "null_prompt_template_id": 1}
    assert summary.skipped_examples["duplicate_request_id"] == [2]  # the first r1 is kept
    records = read_records(store, summary.object_keys)
    assert [r["request_id"] for r in records] == ["r1", "r2"]
    assert records[0]["usage"] == {"prompt_tokens": 50, "completion_tokens": 9}
    assert records[0]["latency_ms"] == 512.5 and records[0]["cost_usd"] == 0.0008
    assert records[0]["prompt_template_version"] == "1"
    assert records[1]["response"] is None and records[1]["error"] == "RateLimitError: 429"
    assert records[1]["usage"] is None  # no token counts for a failed call
    assert all(r["user_id"] == "app-1" for r in records)


def test_large_tables_split_into_parts_and_stale_parts_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "many.parquet"
    pq.write_table(pa.table({"text": [f"comment {i}" for i in range(25)], "answer": ["0"] * 25}), path)
    mapping = ColumnMapping(input="text", response="answer", constants={"model": "m", "prompt_template_id": "p"})
    store = LocalStore(tmp_path / "store")

    small = import_table(store, path, mapping, default_day="2024-02-29", max_records_per_object=10)
    assert [len(store.get_bytes(k).splitlines()) for k in small.object_keys] == [10, 10, 5]

    large = import_table(store, path, mapping, default_day="2024-02-29", max_records_per_object=100)
    assert len(large.object_keys) == 1
    assert [info.key for info in store.list(f"{LOG_PREFIX}/")] == list(large.object_keys)
    assert {r["timestamp"] for r in read_records(store, large.object_keys)} == {"2024-02-29T00:00:00.000Z"}


def test_mapping_that_names_a_missing_column_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("comment,answer\nhello,0\n")
    mapping = ColumnMapping(
        input="comment_text", response="answer", constants={"model": "m", "prompt_template_id": "p"}
    )
    with pytest.raises(ImportMappingError, match=r"\['comment_text'\].*columns are \['comment', 'answer'\]"):
        import_table(LocalStore(tmp_path / "store"), path, mapping, default_day="2024-01-01")


@pytest.mark.parametrize(
    ("mapping", "day", "message"),
    [
        (
            ColumnMapping(input="comment", response="answer", constants={"prompt_template_id": "p"}),
            "2024-01-01",
            "'model' needs a column or a constant",
        ),
        (
            ColumnMapping(input="comment", response="answer", constants={"model": "m", "prompt_template_id": "p"}),
            None,
            "pass default_day",
        ),
        (
            ColumnMapping(
                input="comment",
                response="answer",
                constants={"model": "m", "prompt_template_id": "p", "request_id": "x"},
            ),
            "2024-01-01",
            "constants for \\['request_id'\\] are not allowed",
        ),
    ],
)
def test_incomplete_mappings_are_rejected(
    tmp_path: Path, mapping: ColumnMapping, day: str | None, message: str
) -> None:
    path = tmp_path / "t.csv"
    path.write_text("comment,answer\nhello,0\n")
    with pytest.raises(ImportMappingError, match=message):
        import_table(LocalStore(tmp_path / "store"), path, mapping, default_day=day)
    assert not (tmp_path / "store" / LOG_PREFIX).exists()


def test_unknown_extension_needs_an_explicit_format(tmp_path: Path) -> None:
    path = tmp_path / "export.txt"
    path.write_text('{"comment": "hi", "answer": "0"}\n')
    mapping = ColumnMapping(input="comment", response="answer", constants={"model": "m", "prompt_template_id": "p"})
    with pytest.raises(ValueError, match="pass source_format"):
        import_table(LocalStore(tmp_path / "store"), path, mapping, default_day="2024-01-01")
    summary = import_table(
        LocalStore(tmp_path / "store"), path, mapping, default_day="2024-01-01", source_format="jsonl"
    )
    assert summary.rows_written == 1


def test_object_payloads_match_encode_log_object_across_chunks() -> None:
    lines = [f'{{"n":{i},"s":"ü{"x" * i}"}}' for i in range(7)]
    chunked = pa.chunked_array([[line + "\n" for line in lines[:3]], [line + "\n" for line in lines[3:]]])
    assert object_payloads(chunked, [2, 4, 1]) == [
        encode_log_object(lines[:2]),
        encode_log_object(lines[2:6]),
        encode_log_object(lines[6:]),
    ]
