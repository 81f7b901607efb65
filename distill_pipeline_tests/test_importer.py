"""The importer: real teacher answers, CSV and JSONL sources, skipped rows, bad mappings."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import load_task
from distill_pipeline.logs.importer import (
    ColumnMapping,
    ImportMappingError,
    SourceTableError,
    import_table,
    jigsaw_mapping,
    mapping_from_options,
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
    with pytest.raises(SourceTableError, match=r"extension '\.txt': rename it to end in one of \.csv, "):
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


MODEL_AND_PROMPT = {"model": "m", "prompt_template_id": "p"}


@pytest.mark.parametrize(
    ("answers", "found"),
    [
        ([False, True], "bool values (the first at row 0: False)"),
        ([None, [1], [0]], "list<item: int64> values (the first at row 1: [1])"),
        ([None, None, 1], "int64 values (the first at row 2: 1)"),
    ],
)
def test_a_column_of_the_wrong_type_is_refused_not_cast_to_text(tmp_path: Path, answers: list, found: str) -> None:
    # Cast to text, True and [1] would read "true" and "[1]", and the label parser finds 1 in both.
    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps({"text": f"comment {i}", "answer": a}) + "\n" for i, a in enumerate(answers)))
    mapping = ColumnMapping(input="text", response="answer", constants=MODEL_AND_PROMPT)
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ImportMappingError) as refused:
        import_table(store, path, mapping, default_day="2024-01-01")
    assert str(refused.value).startswith(f"column 'answer' (mapped to response) holds {found}, but response takes text")
    assert store.list(f"{LOG_PREFIX}/") == []


def test_ids_may_be_integers_and_numbers_must_be_finite_numbers(tmp_path: Path) -> None:
    rows = [{"id": 7, "text": "hi", "answer": "0", "ms": 12}, {"id": 8, "text": "yo", "answer": "1", "ms": 3.5}]
    path = tmp_path / "calls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    mapping = ColumnMapping(
        input="text", response="answer", request_id="id", latency_ms="ms", constants=MODEL_AND_PROMPT
    )
    summary = import_table(LocalStore(tmp_path / "store"), path, mapping, default_day="2024-01-01")
    records = read_records(LocalStore(tmp_path / "store"), summary.object_keys)
    assert [(r["request_id"], r["latency_ms"]) for r in records] == [("7", 12.0), ("8", 3.5)]

    # CSV cells are text: each is checked to be a finite number; an empty cell (or NaN) is no value.
    csv_path = tmp_path / "calls.csv"
    mapping = dataclasses.replace(mapping, request_id=None)
    for cell, shown in (("1e400", "'1e400'"), ("fast", "'fast'"), ("-inf", "'-inf'")):
        csv_path.write_text(f"text,answer,ms\na,0,\nb,1,NaN\nc,0,{cell}\n")
        with pytest.raises(
            ImportMappingError, match=f"^column 'ms' \\(mapped to latency_ms\\) holds {shown} at row 2,"
        ):
            import_table(LocalStore(tmp_path / "csv"), csv_path, mapping, default_day="2024-01-01")
    csv_path.write_text("text,answer,ms\na,0,\nb,1,NaN\nc,0,1.5e3\n")
    summary = import_table(LocalStore(tmp_path / "csv"), csv_path, mapping, default_day="2024-01-01")
    assert [r["latency_ms"] for r in read_records(LocalStore(tmp_path / "csv"), summary.object_keys)] == [
        None,
        None,
        1500.0,
    ]


def test_reimporting_a_table_with_another_day_moves_its_rows_to_that_day(tmp_path: Path) -> None:
    path = tmp_path / "calls.csv"
    path.write_text("id,text,answer\n" + "".join(f"r{i},comment {i},{i % 2}\n" for i in range(30)))
    mapping = ColumnMapping(input="text", response="answer", request_id="id", constants=MODEL_AND_PROMPT)
    store = LocalStore(tmp_path / "store")

    first = import_table(store, path, mapping, default_day="2024-01-15", max_records_per_object=10)
    corrected = import_table(store, path, mapping, default_day="2024-01-16", max_records_per_object=10)

    assert first.objects_removed == ()
    assert corrected.objects_removed == first.object_keys
    days_of: dict[str, set[str]] = {}
    for info in store.list(f"{LOG_PREFIX}/"):
        for record in read_records(store, [info.key]):
            days_of.setdefault(record["request_id"], set()).add(info.key.split("/")[1])
    assert days_of == {f"r{i}": {"dt=2024-01-16"} for i in range(30)}
    # Another table's objects on the first day are left alone.
    other = tmp_path / "other.csv"
    other.write_text("id,text,answer\nx1,hello,0\n")
    kept = import_table(store, other, mapping, default_day="2024-01-15")
    import_table(store, path, mapping, default_day="2024-01-17")
    assert {info.key for info in store.list(f"{LOG_PREFIX}/dt=2024-01-15/")} == set(kept.object_keys)


@pytest.mark.parametrize(
    ("columns", "constants", "message"),
    [
        (["inptu=text", "response=answer"], [], "no log field 'inptu'; did you mean 'input'?"),
        (["input", "response=answer"], [], "--map 'input' is not FIELD=COLUMN"),
        (["input=text"], [], "no column for response: add --map response=<column>"),
        (["input=a", "input=b", "response=c"], [], "--map gives 'input' twice"),
        (["input=a", "response=c"], ["modle=x"], "no log field 'modle'; did you mean 'model'?"),
        (["input=a", "response=c"], ["params=[1]"], "--constant params=... must be a JSON object"),
    ],
)
def test_command_line_mappings_are_checked(columns: list[str], constants: list[str], message: str) -> None:
    with pytest.raises(ImportMappingError, match=re.escape(message)):
        mapping_from_options(columns, constants)


def test_command_line_mapping_with_constants() -> None:
    mapping = mapping_from_options(["input=text", "response=answer"], ["model=m", 'params={"temperature": 0}'])
    assert (mapping.input, mapping.response) == ("text", "answer")
    assert mapping.constants == {"model": "m", "params": {"temperature": 0}}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.csv",
            "text,answer\na,0,extra\n",
            "is not a readable csv file: CSV parse error: Expected 2 columns, got 3",
        ),
        ("bad.jsonl", '{"text": "a"\n', "is not a readable jsonl file: JSON parse error"),
        ("bad.parquet", "not parquet", "is not a readable parquet file"),
    ],
)
def test_a_source_that_does_not_parse_is_a_source_table_error(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    mapping = ColumnMapping(input="text", response="answer", constants=MODEL_AND_PROMPT)
    with pytest.raises(SourceTableError, match=re.escape(message)):
        import_table(LocalStore(tmp_path / "store"), path, mapping, default_day="2024-01-01")


def test_a_day_that_is_not_a_date_is_a_mapping_error(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("comment,answer\nhello,0\n")
    mapping = ColumnMapping(input="comment", response="answer", constants=MODEL_AND_PROMPT)
    with pytest.raises(ImportMappingError, match=r"the day '2024-13-01' is not a date: write it as YYYY-MM-DD"):
        import_table(LocalStore(tmp_path / "store"), path, mapping, default_day="2024-13-01")
