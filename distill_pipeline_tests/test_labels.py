"""Teacher labels: every record leaves labelled or quarantined with a reason, each response parsed once."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
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


def test_labels_keep_the_records_order_without_a_join_or_a_sort(tmp_path):
    # Rows come out in the records' order (raw_logs writes them by source key and line), which
    # holds only while the plan has neither a join (it reorders rows) nor a sort (it copies the day).
    rows = [r(f"r{i:05d}", ['{"is_bad": 1}', "no idea", '{"is_bad": 0}'][i % 3]) for i in range(30_000)]
    rows += [r(f"e{i:05d}", None, error="RateLimitError") for i in range(500)]
    rows = [{**row, "source_line": line} for line, row in enumerate(rows, start=1)]
    _, labelled, quarantined = run(tmp_path, rows)
    for out in (labelled, quarantined):
        lines = [row["source_line"] for row in out]
        assert lines == sorted(lines)
    con = labels_module._connect(tmp_path / "plan")
    labels_module._logged_view(con, tmp_path / "records.parquet", TOXICITY)
    plan = con.execute("EXPLAIN SELECT * FROM logged WHERE logged_reason IS NULL").fetchall()[0][1]
    assert "JOIN" not in plan.upper() and "ORDER" not in plan.upper()


def test_the_parse_lookup_tells_responses_with_one_hash_apart():
    # Forced collisions: every response hashed to one of two values. The text decides.
    responses = ['{"is_bad": 1}', '{"is_bad": 0}', "no idea", "Toxic."]
    results = parsing.parse_responses(responses, TOXICITY.label)
    lookup = labels_module._ParseLookup(responses, np.array([7, 7, 9, 7], np.uint64), results)
    asked = ["Toxic.", None, '{"is_bad": 0}', "no idea", '{"is_bad": 1}', "Toxic."]
    hashes = pa.array([7 if text != "no idea" else 9 for text in asked], pa.uint64())
    parses = lookup(hashes, pa.array(asked, pa.string())).to_pylist()
    expected = {text: result for text, result in zip(responses, results, strict=True)}
    assert parses[1] is None
    for text, parse in zip(asked, parses, strict=True):
        if text is not None:
            assert (parse["label"], parse["parse_method"]) == (expected[text].label, expected[text].method)


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
            "t_soft": pa.array([None] * n, pa.float64()),
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


SERVED = '{"train_id": "s1", "label": 1, "confidence": 0.97, "latency_ms": 3.0}'


def served_records(path: Path) -> Path:
    """A served day: every call kind, the student's answer where it ran, and one call of each fault."""
    rows = [
        r("teacher", '{"is_bad": 1}', call_kind="teacher", served_by="teacher"),
        r("shadow", '{"is_bad": 0}', call_kind="shadow", served_by="teacher", student=SERVED),
        r("deferred", '{"is_bad": 0}', call_kind="deferred", served_by="teacher", student=SERVED),
        r("sample", '{"is_bad": 0}', call_kind="sample", served_by="student", student=SERVED),
        r("student", None, call_kind="student", served_by="student", student=SERVED),
        r("fallback", None, error="APITimeoutError", call_kind="fallback", served_by="student", student=SERVED),
        r("bare", None, student=SERVED),
        r("shadow-error", None, error="RateLimitError: 429", call_kind="shadow", served_by="teacher", student=SERVED),
    ]
    write_records(path, rows)
    table = pq.read_table(path)
    for name in ("served_by", "call_kind", "student"):
        table = table.append_column(name, pa.array([row.get(name) for row in rows], pa.string()))
    pq.write_table(table, path)
    return path


def test_student_served_calls_are_neither_labels_nor_failures(tmp_path):
    records = served_records(tmp_path / "records.parquet")
    stats = label_records(records, TOXICITY, tmp_path / "work", tmp_path / "labels.parquet", tmp_path / "q.parquet")
    labelled = {row["request_id"]: row["label"] for row in pq.read_table(tmp_path / "labels.parquet").to_pylist()}
    reasons = {row["request_id"]: row["reason"] for row in pq.read_table(tmp_path / "q.parquet").to_pylist()}
    # Labels from the teacher's response only: the student said 1 on every call, the teacher 0.
    assert labelled == {"teacher": 1, "shadow": 0, "deferred": 0, "sample": 0}
    assert reasons == {
        "student": labels_module.STUDENT_SERVED_REASON,
        "fallback": labels_module.STUDENT_SERVED_REASON,
        "bare": labels_module.STUDENT_SERVED_REASON,
        "shadow-error": "provider error: RateLimitError: 429",
    }
    assert (stats.student_served, stats.parse_failures, stats.parse_rate, stats.with_response) == (3, 0, 1.0, 4)

    # A day the student served alone: nothing labelled, nothing failed.
    alone = tmp_path / "alone"
    only = pq.read_table(records).filter(pa.compute.field("call_kind") == "student")
    alone.mkdir()
    pq.write_table(only, alone / "records.parquet")
    stats = label_records(alone / "records.parquet", TOXICITY, alone / "work", alone / "l.parquet", alone / "q.parquet")
    assert (stats.rows_in, stats.labelled, stats.student_served, stats.parse_failures) == (1, 0, 1, 0)


def test_fill_labels_student_served_calls_within_the_budget(tmp_path):
    records = served_records(tmp_path / "records.parquet")
    wanted = labels_module.inputs_for_teachers(records, TOXICITY, tmp_path / "inputs", "fill")
    # The provider error is required; the student-served inputs come apart, to be asked last.
    assert wanted.required == ["comment number 8"]
    assert wanted.student_served == ["comment number 5", "comment number 6", "comment number 7"]
    # The budget ran out after one student-served input: the other two get no verdict row.
    verdicts = verdicts_for(["comment number 8", "comment number 5"], [1, 1], [None, None])
    stats = label_records(
        records, TOXICITY, tmp_path / "work", tmp_path / "labels.parquet", tmp_path / "q.parquet",
        mode="fill", verdicts=verdicts,
    )  # fmt: skip
    labelled = {
        row["request_id"]: row["label_source"] for row in pq.read_table(tmp_path / "labels.parquet").to_pylist()
    }
    assert labelled["student"] == "teacher" and labelled["shadow-error"] == "teacher" and labelled["shadow"] == "logged"
    reasons = {row["request_id"]: row["reason"] for row in pq.read_table(tmp_path / "q.parquet").to_pylist()}
    assert reasons == {"fallback": labels_module.STUDENT_SERVED_REASON, "bare": labels_module.STUDENT_SERVED_REASON}
    assert (stats.to_teachers, stats.teacher_failures, stats.teacher_failure_rate) == (2, 0, 0.0)
    assert (stats.student_served, stats.student_served_filled) == (2, 1)


class _LedgerEntry:
    def __init__(self, response: str) -> None:
        self.response, self.served_model, self.label_distribution = response, "openai/teacher-a", None


class _BudgetedClient:
    """Answers ``budget`` calls, then raises BudgetExceeded as the real client does, having kept what it paid."""

    def __init__(self, budget: int) -> None:
        from distill_pipeline.teachers.client import RunTotals

        self.totals, self.budget, self.paid = RunTotals(), budget, {}
        self.ledger = self

    def get(self, key: str):
        return _LedgerEntry(self.paid[key]) if key in self.paid else None

    def keys_for(self, spec, template, inputs):
        return [f"{spec.model}|{text}" for text in inputs]

    def label(self, spec, template, inputs, label=None):
        from distill_pipeline.teachers.client import Answer, BudgetExceeded

        answers = []
        for key in self.keys_for(spec, template, inputs):
            if key not in self.paid:
                if self.budget == 0:
                    raise BudgetExceeded("teacher budget reached", self.totals)
                self.budget -= 1
                self.paid[key] = '{"is_bad": 1}'
            answers.append(Answer(key, self.paid[key], None, False, spec.model))
        return answers


def test_ask_teachers_keeps_paid_student_served_answers_when_the_budget_runs_out():
    from distill_pipeline.teachers.client import BudgetExceeded, TeacherSpec
    from distill_pipeline.teachers.relabel import ask_teachers

    spec = TeacherSpec("openai/teacher-a", "simple_prompt", 0.0, 64)
    client = _BudgetedClient(budget=3)
    verdicts = ask_teachers(client, [spec], TOXICITY, ["a", "b"], optional=["c", "d", "e"])
    assert verdicts.table.column("input").to_pylist() == ["a", "b", "c"]
    assert verdicts.table.column("t_label").to_pylist() == [1, 1, 1] and verdicts.unasked == 2
    # Required inputs still stop the run when the budget cannot pay for them.
    with pytest.raises(BudgetExceeded):
        ask_teachers(_BudgetedClient(budget=1), [spec], TOXICITY, ["a", "b"], optional=["c"])


def test_a_logged_label_distribution_becomes_the_soft_label_when_it_is_one(tmp_path):
    json_answer = '{"is_bad": 1}'
    rows = [
        r("soft", json_answer, label_distribution='{"0": 0.25, "1": 0.75}'),
        r("one-key", json_answer, label_distribution='{"1": 1.0}'),
        r("hard", json_answer),
        # Not a distribution: the hard label stays, the soft one is left out rather than guessed.
        r("sums-wrong", json_answer, label_distribution='{"0": 0.5, "1": 0.6}'),
        r("unknown-key", json_answer, label_distribution='{"2": 1.0}'),
        r("not-a-number", json_answer, label_distribution='{"0": "x", "1": 1.0}'),
        r("not-an-object", json_answer, label_distribution="[0.2, 0.8]"),
    ]
    schema = RECORD_SCHEMA.append(pa.field("label_distribution", pa.string()))
    full = [{**row, "label_distribution": row.get("label_distribution")} for row in rows]
    records = tmp_path / "records.parquet"
    write_records(records, [{k: v for k, v in row.items() if k != "label_distribution"} for row in rows])
    table = pq.read_table(records).append_column(
        "label_distribution", pa.array([row["label_distribution"] for row in full])
    )
    pq.write_table(table.cast(schema), records)
    stats = label_records(records, TOXICITY, tmp_path / "work", tmp_path / "labels.parquet", tmp_path / "q.parquet")
    soft = {row["request_id"]: row["soft_label"] for row in pq.read_table(tmp_path / "labels.parquet").to_pylist()}
    assert stats.labelled == len(rows)
    assert soft == {
        "soft": 0.75,
        "one-key": 1.0,
        "hard": None,
        "sums-wrong": None,
        "unknown-key": None,
        "not-a-number": None,
        "not-an-object": None,
    }


def test_teachers_with_log_probabilities_give_soft_labels_one_teacher_alone_does_not_vote_one(monkeypatch):
    from distill_pipeline.teachers.client import Answer, RunTotals, TeacherSpec
    from distill_pipeline.teachers.relabel import ask_teachers

    class Client:
        totals = RunTotals()

    def labeller_with(distributions):
        def label(spec, template, inputs):
            return [
                Answer(f"{spec.model}-{i}", '{"is_bad": 1}', None, False, spec.model, distributions.get(spec.model))
                for i, _ in enumerate(inputs)
            ]

        return label

    a, b = TeacherSpec("openai/a"), TeacherSpec("openai/b")
    both = labeller_with({"openai/a": {"0": 0.2, "1": 0.8}, "openai/b": {"0": 0.4, "1": 0.6}})
    verdicts = ask_teachers(Client(), [a, b], TOXICITY, ["x"], labeller=both)
    assert verdicts.table["t_soft"].to_pylist() == [pytest.approx(0.7)]
    # Without distributions, two teachers' votes are still a share; one teacher's vote is no soft label.
    plain = labeller_with({})
    assert ask_teachers(Client(), [a, b], TOXICITY, ["x"], labeller=plain).table["t_soft"].to_pylist() == [1.0]
    assert ask_teachers(Client(), [a], TOXICITY, ["x"], labeller=plain).table["t_soft"].to_pylist() == [None]
    single = labeller_with({"openai/a": {"0": 0.1, "1": 0.9}})
    assert ask_teachers(Client(), [a], TOXICITY, ["x"], labeller=single).table["t_soft"].to_pylist() == [0.9]
