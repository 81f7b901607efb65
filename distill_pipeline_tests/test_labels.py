"""Teacher labels: every record leaves labelled or quarantined with a reason, each response parsed once."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.task import load_task
from distill_pipeline.data import labels as labels_module
from distill_pipeline.data import parsing
from distill_pipeline.data.labels import LABEL_COLUMNS, REASON_CHARS, LabelStats, label_records

TOXICITY = load_task("toxicity")
T0 = dt.datetime(2026, 3, 4, 12, 0, tzinfo=dt.UTC)

RECORD_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("day", pa.date32()),
        ("user_id", pa.string()),
        ("tenant_id", pa.string()),
        ("task", pa.string()),
        ("model", pa.string()),
        ("prompt_template_id", pa.string()),
        ("prompt_template_version", pa.string()),
        ("input", pa.string()),
        ("response", pa.string()),
        ("error", pa.string()),
        ("source_key", pa.string()),
        ("source_line", pa.int64()),
    ]
)


def write_records(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A ``raw_logs``-shaped Parquet file; each row gives at least request_id, response, error."""
    full = []
    for index, row in enumerate(rows, start=1):
        full.append(
            {
                "timestamp": T0 + dt.timedelta(seconds=index),
                "day": T0.date(),
                "user_id": f"user-{index % 3}",
                "tenant_id": "forum-web",
                "task": "toxicity",
                "model": "openai/gpt-4",
                "prompt_template_id": "simple_prompt",
                "prompt_template_version": "1",
                "input": f"comment number {index}",
                "source_key": "logs/dt=2026-03-04/a.jsonl",
                "source_line": index,
                **row,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=RECORD_SCHEMA), path)
    return path


def run(tmp_path: Path, rows: list[dict[str, Any]], task=TOXICITY) -> tuple[LabelStats, list, list]:
    records = write_records(tmp_path / "records.parquet", rows)
    labels_path, quarantine_path = tmp_path / "labels.parquet", tmp_path / "label_quarantine.parquet"
    stats = label_records(records, task, tmp_path / "work", labels_path, quarantine_path)
    assert tuple(pq.read_schema(labels_path).names) == LABEL_COLUMNS
    labelled = pq.read_table(labels_path).to_pylist()
    quarantined = pq.read_table(quarantine_path).to_pylist()
    assert stats.rows_in == len(rows)
    assert stats.labelled + stats.quarantined == stats.rows_in
    assert (stats.labelled, stats.quarantined) == (len(labelled), len(quarantined))
    assert sum(stats.reasons.values()) == stats.quarantined
    assert sum(stats.label_counts.values()) == stats.labelled == sum(stats.methods.values())
    # Every record comes out exactly once.
    out_ids = [row["request_id"] for row in labelled] + [row["request_id"] for row in quarantined]
    assert sorted(out_ids) == sorted(row["request_id"] for row in rows)
    assert all(row["reason"] for row in quarantined)
    return stats, labelled, quarantined


def r(request_id: str, response: str | None, error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, "response": response, "error": error, **extra}


def test_labels_and_quarantine_reasons(tmp_path):
    long_error = "InternalServerError: " + "x" * 1000
    rows = [
        r("json", '{"is_bad": 1}'),
        r("fenced", '```json\n{"is_bad": 0}\n```'),
        r("python", "{'is_bad': 1}"),
        r("plain", "Toxic."),
        r("cot", "{'reason_innocent': 'it's fine', 'is_bad': 0}"),
        # A logged error beside a usable response: the response is what counts.
        r("error-and-response", '{"is_bad": 0}', error="retried after a timeout"),
        r("no-task", '{"is_bad": 1}', task=None),
        r("rate-limited", None, error="RateLimitError: 429 Rate limit reached"),
        r("long-error", None, error=long_error),
        r("refusal", "I'm sorry, I can't help with that."),
        r("out-of-range", '{"is_bad": 7}'),
        r("wrong-key", '{"toxic": 1}'),
        r("empty", "   "),
        r("nothing", None, error=None),
        r("other-task", '{"is_bad": 1}', task="sentiment"),
        r("other-task-error", None, error="RateLimitError", task="spam"),
    ]
    stats, labelled, quarantined = run(tmp_path, rows)

    assert {row["request_id"]: (row["label"], row["parse_method"]) for row in labelled} == {
        "json": (1, "json"),
        "fenced": (0, "json"),
        "python": (1, "python_literal"),
        "plain": (1, "plain"),
        "cot": (0, "key_regex"),
        "error-and-response": (0, "json"),
        "no-task": (1, "json"),
    }
    # The labelled table keeps the order of the log and the record's provenance.
    assert [row["source_line"] for row in labelled] == sorted(row["source_line"] for row in labelled)
    first = labelled[0]
    assert (first["input"], first["user_id"], first["timestamp"]) == (
        "comment number 1",
        "user-1",
        T0 + dt.timedelta(seconds=1),
    )

    reasons = {row["request_id"]: row["reason"] for row in quarantined}
    assert reasons == {
        "rate-limited": "provider error: RateLimitError: 429 Rate limit reached",
        "long-error": "provider error: " + long_error[:REASON_CHARS],
        "refusal": "unparseable response: unrecognised format",
        "out-of-range": "unparseable response: value 7 is not a label",
        "wrong-key": "unparseable response: no 'is_bad' key in JSON object",
        "empty": "unparseable response: empty response",
        "nothing": "unparseable response: no response",
        # Another task's records are set aside whatever their answer: the first reason wins.
        "other-task": "record of another task: sentiment",
        "other-task-error": "record of another task: spam",
    }
    by_id = {row["request_id"]: row for row in quarantined}
    assert by_id["refusal"]["response_excerpt"] == "I'm sorry, I can't help with that."
    assert by_id["refusal"]["input_excerpt"] == "comment number 10"
    assert by_id["rate-limited"]["response_excerpt"] is None

    assert stats.label_counts == {0: 3, 1: 4}
    assert stats.methods == {"json": 4, "python_literal": 1, "plain": 1, "key_regex": 1}
    # Parse rate is over the responses that could be parsed for this task: errors and other
    # tasks' records do not count against the parser.
    assert stats.with_response == 7 + 4
    assert stats.parse_failures == 4
    assert stats.parse_rate == pytest.approx(7 / 11)


def test_parse_rate_is_one_when_every_call_failed(tmp_path):
    stats, labelled, _ = run(tmp_path, [r(f"e{i}", None, error="APITimeoutError") for i in range(3)])
    assert labelled == []
    assert stats.with_response == 0
    assert stats.parse_rate == 1.0
    assert stats.reasons == {"provider error: APITimeoutError": 3}


def test_each_distinct_response_is_parsed_once(tmp_path, monkeypatch):
    calls: Counter[str | None] = Counter()
    real = parsing.parse_label

    def spy(response, label):
        calls[response] += 1
        return real(response, label)

    monkeypatch.setattr(parsing, "parse_label", spy)
    if hasattr(labels_module, "parse_label"):
        monkeypatch.setattr(labels_module, "parse_label", spy)

    answers = ['{"is_bad": 1}', '```json\n{"is_bad": 0}\n```', "no idea", "{'is_bad': 0}"]
    rows = [r(f"r{i}", answers[i % len(answers)]) for i in range(400)]
    rows += [r(f"e{i}", None, error="RateLimitError") for i in range(20)]
    rows += [r(f"o{i}", answers[0], task="other") for i in range(5)]
    stats, _, _ = run(tmp_path, rows)

    assert calls == Counter(dict.fromkeys(answers, 1))
    assert stats.labelled == 300
    assert stats.reasons == {
        "unparseable response: unrecognised format": 100,
        "provider error: RateLimitError": 20,
        "record of another task: other": 5,
    }
    assert stats.parse_rate == pytest.approx(300 / 400)


def test_labels_follow_the_task(tmp_path):
    # A three-class task with a negative label and its own key: nothing may assume toxicity's 0/1.
    folder = tmp_path / "sentiment"
    (folder / "prompts").mkdir(parents=True)
    (folder / "prompts" / "p.txt").write_text("Rate the sentiment of: %s")
    (folder / "task.toml").write_text(
        """
id = "sentiment"
[label]
field = "sentiment"
values = [-1, 0, 1]
names = ["negative", "neutral", "positive"]
aliases = { "0" = ["mixed"] }
[[prompts]]
id = "p"
file = "prompts/p.txt"
"""
    )
    task = load_task(folder)
    rows = [
        r("neg", '{"sentiment": -1}', task="sentiment"),
        r("mixed", "Mixed.", task="sentiment"),
        r("pos", "positive", task="sentiment"),
        r("toxicity-key", '{"is_bad": 1}', task="sentiment"),
        r("toxicity-record", '{"sentiment": 1}', task="toxicity"),
    ]
    stats, labelled, quarantined = run(tmp_path / "run", rows, task=task)
    assert {row["request_id"]: row["label"] for row in labelled} == {"neg": -1, "mixed": 0, "pos": 1}
    assert {row["request_id"]: row["reason"] for row in quarantined} == {
        "toxicity-key": "unparseable response: no 'sentiment' key in JSON object",
        "toxicity-record": "record of another task: toxicity",
    }
    assert stats.label_counts == {-1: 1, 0: 1, 1: 1}


def test_keys_quoted_in_reasons_and_excerpts_are_redacted(tmp_path, monkeypatch):
    key = "sk-proj-Zq8LmN3vR7tY1wX5cB9dF2gH4jK6pQ0s"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    # The key straddles the reason's cut: redacted before it is cut, so no part of it survives.
    straddling = "x" * (REASON_CHARS - 10) + f" {key}"
    rows = [
        r("echo", None, error=f"BadRequestError: Received Authorization: Bearer {key}"),
        r("cut", None, error=straddling),
        r("answer", f"my key is {key}, no label"),
    ]
    _, _, quarantined = run(tmp_path, rows)
    reasons = {row["request_id"]: row["reason"] for row in quarantined}
    assert reasons["echo"] == "provider error: BadRequestError: Received Authorization: ***"
    assert reasons["cut"] == "provider error: " + "x" * (REASON_CHARS - 10) + " ***"
    assert {row["response_excerpt"] for row in quarantined} == {None, "my key is ***, no label"}
    files = [tmp_path / "labels.parquet", tmp_path / "label_quarantine.parquet"]
    assert all(key[:12].encode() not in path.read_bytes() for path in files)


def verdicts_for(inputs: list[str], labels: list[int | None], reasons: list[str | None]) -> pa.Table:
    n = len(inputs)
    return pa.table(
        {
            "input": inputs,
            "t_label": pa.array(labels, pa.int64()),
            "t_method": ["json" if label is not None else None for label in labels],
            "t_model": ["openai/teacher-a"] * n,
            "t_prompt_id": ["simple_prompt"] * n,
            "t_prompt_version": ["1"] * n,
            "t_agreement": [1.0 if label is not None else None for label in labels],
            "t_votes": pa.array([1 if label is not None else 0 for label in labels], pa.int64()),
            "t_tied": [False] * n,
            "t_detail": ["[]"] * n,
            "t_response": ['{"is_bad": 0}' if label is not None else None for label in labels],
            "t_reason": reasons,
        }
    )


def test_rows_no_teacher_answered_are_counted_apart_from_parse_failures(tmp_path):
    rows = [r(f"r{i}", '{"is_bad": 1}') for i in range(1, 5)]
    records = write_records(tmp_path / "records.parquet", rows)
    inputs = [f"comment number {i}" for i in range(1, 5)]
    verdicts = verdicts_for(
        inputs,
        [0, None, None, None],
        [None, "unparseable response: unrecognised format (openai/teacher-a)", "provider error: timeout", None],
    )
    # The last input has no verdict row at all: asked, never answered.
    stats = label_records(
        records, TOXICITY, tmp_path / "work", tmp_path / "labels.parquet", tmp_path / "quarantine.parquet",
        mode="relabel", verdicts=verdicts.slice(0, 3),
    )  # fmt: skip
    assert (stats.to_teachers, stats.teacher_failures, stats.with_response, stats.labelled) == (4, 2, 2, 1)
    assert stats.teacher_failure_rate == 0.5 and stats.parse_rate == 0.5


def test_logged_mode_hands_nothing_to_teachers(tmp_path):
    stats, _, _ = run(tmp_path, [r("e", None, error="APITimeoutError")])
    assert (stats.to_teachers, stats.teacher_failures, stats.teacher_failure_rate) == (0, 0, 0.0)
