"""The traffic simulator: deterministic, skewed, every answer format, counted faults."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.layout import GOLD_LABELS
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import Task, load_task
from distill_pipeline.demo.simulator import (
    MALFORMED_KINDS,
    RESPONSE_FORMATS,
    TrafficProfile,
    generate_traffic,
    simulate_traffic,
)
from distill_pipeline.logs.schema import LOG_PREFIX, SCHEMA_FIELDS, log_object_prefix

DAYS = ["2024-03-01", "2024-03-02"]
RECORDS_PER_DAY = 10_000
# Faults at 1% so that every kind shows up in a small run.
PROFILE = TrafficProfile(malformed_rate=0.01, records_per_object=3_000)
JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "object": (dict,)}
REQUIRED = [spec.name for spec in SCHEMA_FIELDS if spec.required]


def read_lines(store: LocalStore) -> list[bytes]:
    return [line for info in store.list(f"{LOG_PREFIX}/") for line in store.get_bytes(info.key).splitlines()]


def classify(line: bytes) -> tuple[str, dict | None]:
    """What ingestion should make of one line: 'valid' or the kind of fault (duplicates aside)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8", None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return ("truncated_json" if text.startswith("{") else "not_json"), None
    if any(name not in record for name in REQUIRED):
        return "missing_required_field", None
    for spec in SCHEMA_FIELDS:
        value = record.get(spec.name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, JSON_TYPES[spec.json_type])):
            return "wrong_type", None
    return "valid", record


def response_format(record: dict, label_field: str) -> str:
    response = record["response"]
    if response is None:
        assert record["error"]
        return "provider_error"
    if response == "":
        return "empty"
    if response.startswith("```json"):
        return "json_fenced"
    if "'reason_" in response:
        return "cot_dict"
    if response.startswith("{'"):
        return "python_dict"
    if response.startswith("{"):
        return "json_bare"
    if "```json" in response:
        return "explained_json"
    return "plain_text"


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task("toxicity")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory, task: Task):
    store = LocalStore(tmp_path_factory.mktemp("sim") / "store")
    summary = simulate_traffic(store, days=DAYS, records_per_day=RECORDS_PER_DAY, seed=11, task=task, profile=PROFILE)
    return store, summary


def test_objects_are_batched_per_day_under_the_log_prefix(simulated) -> None:
    store, summary = simulated
    assert summary.lines_written == len(DAYS) * RECORDS_PER_DAY
    for day in DAYS:
        keys = [key for key in summary.object_keys if key.startswith(log_object_prefix(day))]
        assert len(keys) >= 3  # several flushes a day, like a batching client
    assert [info.key for info in store.list(f"{LOG_PREFIX}/")] == sorted(summary.object_keys)


def test_same_seed_same_bytes_and_days_are_independent(simulated, tmp_path: Path, task: Task) -> None:
    store, summary = simulated
    again = LocalStore(tmp_path / "again")
    simulate_traffic(again, days=DAYS, records_per_day=RECORDS_PER_DAY, seed=11, task=task, profile=PROFILE)
    assert all(again.get_bytes(k) == store.get_bytes(k) for k in summary.object_keys)

    # A day's objects do not depend on which other days were simulated with it.
    second_only = LocalStore(tmp_path / "second")
    alone = simulate_traffic(
        second_only, days=DAYS[1:], records_per_day=RECORDS_PER_DAY, seed=11, task=task, profile=PROFILE
    )
    assert all(second_only.get_bytes(k) == store.get_bytes(k) for k in alone.object_keys)

    other = LocalStore(tmp_path / "other")
    changed = simulate_traffic(
        other, days=DAYS[:1], records_per_day=RECORDS_PER_DAY, seed=12, task=task, profile=PROFILE
    )
    assert changed.object_keys[0] == f"{log_object_prefix(DAYS[0])}sim-12-00000.jsonl"
    assert other.get_bytes(changed.object_keys[0]) != store.get_bytes(summary.object_keys[0])


def test_malformed_lines_in_the_objects_match_the_summary(simulated) -> None:
    store, summary = simulated
    found: Counter[str] = Counter()
    request_ids: set[str] = set()
    for line in read_lines(store):
        kind, record = classify(line)
        if record is not None:
            if record["request_id"] in request_ids:
                kind = "duplicate_request_id"
            request_ids.add(record["request_id"])
        found[kind] += 1
    assert set(MALFORMED_KINDS) <= set(found)
    assert {kind: found[kind] for kind in MALFORMED_KINDS} == summary.malformed
    assert found["valid"] == summary.valid_records == summary.lines_written - sum(summary.malformed.values())


def test_every_response_format_appears_in_realistic_proportions(simulated, task: Task) -> None:
    store, summary = simulated
    records = [record for line in read_lines(store) if (record := classify(line)[1]) is not None]
    seen: dict[str, dict] = {}
    records = [seen.setdefault(r["request_id"], r) for r in records if r["request_id"] not in seen]
    counted = Counter(response_format(r, task.label.field) for r in records)
    assert counted == Counter(summary.response_formats)
    assert set(counted) == set(RESPONSE_FORMATS)
    share = {name: count / len(records) for name, count in counted.items()}
    assert share["json_fenced"] > 0.7
    assert 0.05 < share["cot_dict"] < 0.12
    assert 0.003 < share["provider_error"] < 0.03
    for record in records:
        is_cot = record["prompt_template_id"] == "cot_prompt"
        if record["response"]:
            assert ("'reason_innocent'" in record["response"]) == is_cot
            assert task.label.field in record["response"] or response_format(record, task.label.field) == "plain_text"
        if record["error"]:
            assert record["usage"] is None and record["cost_usd"] == 0.0
        else:
            usage = record["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert record["cost_usd"] > 0 and record["latency_ms"] > 0
    assert {r["prompt_template_version"] for r in records} == {"1"}
    assert 0.92 < summary.teacher_accuracy < 0.96
    assert 0.08 < summary.true_positive_rate < 0.16


def test_a_few_power_users_send_much_of_the_traffic(simulated) -> None:
    store, summary = simulated
    users = Counter(record["user_id"] for line in read_lines(store) if (record := classify(line)[1]) is not None)
    ranked = [count for _user, count in users.most_common()]
    top_one_percent = sum(ranked[: max(1, len(ranked) // 100)])
    assert top_one_percent / sum(ranked) > 0.20
    assert len(users) == summary.users


def test_inputs_have_duplicates_spam_and_a_long_tail(task: Task) -> None:
    table = generate_traffic(days=DAYS[:1], records_per_day=RECORDS_PER_DAY, seed=5, task=task)
    inputs = table.column("input").to_pylist()
    counts = Counter(inputs)
    assert 0.75 < len(counts) / len(inputs) < 0.97  # some exact duplicates, mostly distinct
    assert max(counts.values()) > 20  # copy-paste spam
    lengths = sorted(len(text) for text in inputs)
    assert lengths[len(lengths) // 2] < 150 < lengths[int(len(lengths) * 0.99)]
    kinds = Counter(table.column("text_kind").to_pylist())
    assert {"benign", "toxic", "borderline", "spam", "exact_duplicate", "near_duplicate"} <= set(kinds)
    truth = table.column("true_label").to_pylist()
    teacher = table.column("teacher_label").to_pylist()
    wrong = [
        t != a
        for t, a, k in zip(truth, teacher, table.column("text_kind").to_pylist(), strict=True)
        if a is not None and k == "borderline"
    ]
    assert sum(wrong) / len(wrong) > 0.1  # the hard cases fool the teacher more often


def test_label_field_and_prompts_come_from_the_task(tmp_path: Path, task: Task) -> None:
    renamed = dataclasses.replace(
        task,
        label=dataclasses.replace(task.label, field="is_toxic"),
        prompts={
            pid: dataclasses.replace(prompt, text=prompt.text.replace("is_bad", "is_toxic"), version="7")
            for pid, prompt in task.prompts.items()
        },
    )
    store = LocalStore(tmp_path / "store")
    summary = simulate_traffic(
        store, days=DAYS[:1], records_per_day=2_000, seed=3, task=renamed, profile=TrafficProfile(malformed_rate=0.0)
    )
    records = [json.loads(line) for line in read_lines(store)]
    responses = [r["response"] for r in records if r["response"]]
    assert not any("is_bad" in text for text in responses)
    assert any('"is_toxic": 1' in text for text in responses)
    assert any("'is_toxic': 0" in text for text in responses)
    assert {r["prompt_template_version"] for r in records} == {"7"}
    assert summary.valid_records == 2_000 and sum(summary.malformed.values()) == 0


def test_inputs_and_labels_can_come_from_a_corpus(tmp_path: Path, task: Task) -> None:
    corpus = tmp_path / "corpus.csv"
    texts = [f"real comment number {i}" for i in range(50)]
    pa_csv.write_csv(pa.table({"comment_text": texts, "is_bad": [i % 2 for i in range(50)]}), corpus)
    table = generate_traffic(days=DAYS[:1], records_per_day=3_000, seed=1, task=task, corpus_path=corpus)
    by_text = dict(zip(texts, [i % 2 for i in range(50)], strict=True))
    for text, kind, label in zip(
        *(table.column(c).to_pylist() for c in ("input", "text_kind", "true_label")), strict=True
    ):
        if kind in ("corpus", "exact_duplicate"):
            assert by_text[text] == label
    assert Counter(table.column("text_kind").to_pylist())["corpus"] > 2_500

    with pytest.raises(ValueError, match="lacks column"):
        generate_traffic(
            days=DAYS[:1], records_per_day=10, seed=1, task=task, corpus_path=corpus, corpus_text_column="text"
        )


def test_generated_table_is_what_the_objects_hold(simulated, task: Task) -> None:
    store, _summary = simulated
    table = generate_traffic(days=DAYS, records_per_day=RECORDS_PER_DAY, seed=11, task=task, profile=PROFILE)
    valid = table.filter(pc.equal(table["line_kind"], "valid"))
    written = {}
    for line in read_lines(store):
        record = classify(line)[1]
        if record is not None:
            written.setdefault(record["request_id"], record)
    assert set(valid.column("request_id").to_pylist()) == set(written)
    for row in valid.slice(0, 200).to_pylist():
        record = written[row["request_id"]]
        assert (record["input"], record["response"], record["user_id"]) == (
            row["input"],
            row["response"],
            row["user_id"],
        )


def test_a_share_of_the_truth_becomes_the_gold_table(tmp_path: Path, task: Task) -> None:
    store = LocalStore(tmp_path / "store")
    summary = simulate_traffic(
        store, days=DAYS, records_per_day=RECORDS_PER_DAY, seed=11, task=task, profile=PROFILE, gold_fraction=0.5
    )
    table = generate_traffic(days=DAYS, records_per_day=RECORDS_PER_DAY, seed=11, task=task, profile=PROFILE)
    valid = table.filter(pc.equal(table["line_kind"], "valid")).to_pylist()
    truths: dict[str, set[int]] = {}
    for row in valid:
        truths.setdefault(row["input"], set()).add(row["true_label"])
    unambiguous = {text: labels.pop() for text, labels in truths.items() if len(labels) == 1}
    gold = pq.read_table(store.root / GOLD_LABELS).to_pylist()
    assert summary.gold_rows == len(gold) == round(0.5 * len(unambiguous))
    assert all(unambiguous[row["input"]] == row["gold_label"] for row in gold)
    assert (
        simulate_traffic(LocalStore(tmp_path / "none"), days=DAYS, records_per_day=10, seed=1, task=task).gold_rows == 0
    )
    assert not (tmp_path / "none" / GOLD_LABELS).exists()


def test_logged_label_distributions_are_a_calibrated_teachers_and_reach_the_labels(tmp_path: Path, task: Task) -> None:
    from distill_pipeline.data.ingest import ingest_objects
    from distill_pipeline.data.labels import label_records

    soft = dataclasses.replace(PROFILE, label_distributions=True, malformed_rate=0.0)
    plain_table = generate_traffic(days=DAYS[:1], records_per_day=20_000, seed=5, task=task, profile=PROFILE)
    table = generate_traffic(days=DAYS[:1], records_per_day=20_000, seed=5, task=task, profile=soft)
    # The calls themselves are those of the same traffic without distributions.
    assert (
        table.drop_columns(["label_distribution"])
        .select(["input", "response"])
        .equals(plain_table.select(["input", "response"]))
    )
    rows = [r for r in table.to_pylist() if r["teacher_label"] is not None]
    confidence = [r["label_distribution"][str(r["teacher_label"])] for r in rows]
    right = [r["teacher_label"] == r["true_label"] for r in rows]
    assert all(abs(sum(r["label_distribution"].values()) - 1) < 1e-3 for r in rows)
    # Calibrated: in each confidence band the teacher is right about as often as it is sure.
    bands = [(0.5, 0.8), (0.8, 0.95), (0.95, 1.01)]
    for low, high in bands:
        in_band = [ok for c, ok in zip(confidence, right, strict=True) if low <= c < high]
        mean_confidence = sum(c for c in confidence if low <= c < high) / len(in_band)
        assert len(in_band) > 300
        assert abs(sum(in_band) / len(in_band) - mean_confidence) < 0.04
    # Wrong answers come with less confidence than right ones: the signal soft targets carry.
    wrong_mean = sum(c for c, ok in zip(confidence, right, strict=True) if not ok) / right.count(False)
    right_mean = sum(c for c, ok in zip(confidence, right, strict=True) if ok) / right.count(True)
    assert wrong_mean < right_mean - 0.1

    store = LocalStore(tmp_path / "store")
    summary = simulate_traffic(store, days=DAYS[:1], records_per_day=2_000, seed=5, task=task, profile=soft)
    records, quarantine = tmp_path / "records.parquet", tmp_path / "quarantine.parquet"
    ingest_objects(store, summary.object_keys, tmp_path / "work", records, quarantine)
    stats = label_records(records, task, tmp_path / "work", tmp_path / "labels.parquet", tmp_path / "q.parquet")
    labelled = pq.read_table(tmp_path / "labels.parquet").to_pylist()
    assert stats.labelled == len(labelled) > 1_500
    with_soft = [r for r in labelled if r["soft_label"] is not None]
    assert len(with_soft) == len(labelled)
    # A soft label agrees with its hard label's side of one half (the answer is the teacher's argmax).
    assert all((r["soft_label"] >= 0.5) == (r["label"] == 1) for r in with_soft if r["soft_label"] != 0.5)
