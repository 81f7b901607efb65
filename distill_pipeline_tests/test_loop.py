"""The loop closed on served traffic: student-served days label cleanly, live agreement and feedback
are measured on the right calls with intervals, and a slip of the served student starts one retraining."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.layout import CHAMPION_CURRENT, ab_report_prefix, drift_report_prefix
from distill_pipeline.core.published import RawLogs, TeacherLabels
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.tables import read_report
from distill_pipeline.core.task import MonitoringConfig, Task
from distill_pipeline.data.labels import STUDENT_SERVED_REASON
from distill_pipeline.defs.data.ingest import raw_logs
from distill_pipeline.defs.logs.assets import teacher_logs
from distill_pipeline.defs.monitoring.assets import ab_report, drift_report, user_feedback
from distill_pipeline.defs.monitoring.jobs import DRIFT_SIGNAL_TAG, TRIGGER_TAG
from distill_pipeline.defs.monitoring.sensors import drift_retraining_sensor
from distill_pipeline.defs.teachers.labelling import teacher_labels
from distill_pipeline.demo.simulator import TrafficProfile, generate_traffic, simulate_traffic
from distill_pipeline.logs.schema import feedback_object_key
from distill_pipeline.monitoring import drift, feedback, live
from distill_pipeline.monitoring.proportions import two_proportion_test, wilson
from distill_pipeline_tests.test_monitoring import DAYS, _resources, tiny_task

ASSETS = [teacher_logs, raw_logs, teacher_labels, drift_report, ab_report, user_feedback]
TRAIN_ID = "sim-student"


@pytest.fixture
def task(tmp_path: Path) -> Task:
    return tiny_task(tmp_path / "task")


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def _served_day(store: LocalStore, task: Task, day: str, rollout: str = "full", agreement: float = 0.93):
    return simulate_traffic(
        store,
        days=[day],
        records_per_day=400,
        seed=5,
        task=task,
        profile=TrafficProfile(
            records_per_object=400, rollout=rollout, student_agreement=agreement, student_train_id=TRAIN_ID
        ),
    )


def _materialize(selection: list[str], store: LocalStore, task: Task, instance, day: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        ASSETS,
        selection=selection,
        partition_key=day,
        resources=_resources(store, task),
        instance=instance,
        raise_on_error=False,
    )


def test_a_student_served_day_labels_only_teacher_answers_and_trips_no_check(local_store, task, instance, tmp_path):
    summary = _served_day(local_store, task, DAYS[0])
    assert set(summary.call_kinds) == {"student", "sample"}
    result = _materialize(["raw_logs", "teacher_labels"], local_store, task, instance, DAYS[0])
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"quarantine_rate": True, "parse_failure_rate": True, "teacher_failure_rate": True,
                      "labelled_rows": True}  # fmt: skip

    records = pq.read_table(RawLogs(local_store).records(DAYS[0], tmp_path)).to_pylist()
    labels = pq.read_table(TeacherLabels(local_store).labels(DAYS[0], tmp_path)).to_pylist()
    kind = {row["request_id"]: row["call_kind"] for row in records}
    student = {row["request_id"]: json.loads(row["student"])["label"] for row in records}
    # Only calls the teacher answered carry a label, and where the student said otherwise, the
    # teacher's answer is the label.
    assert labels and {kind[row["request_id"]] for row in labels} == {"sample"}
    assert any(row["label"] != student[row["request_id"]] for row in labels)
    (materialization,) = result.asset_materializations_for_node("teacher_labels")
    unlabelled = materialization.metadata["student_served_unlabelled"].value
    assert unlabelled == summary.call_kinds["student"] > 0
    quarantine = read_report_table(local_store, tmp_path)
    assert quarantine.count(STUDENT_SERVED_REASON) == unlabelled


def read_report_table(store: LocalStore, tmp_path: Path) -> list[str]:
    path = tmp_path / "quarantine.parquet"
    store.get_file(f"tables/teacher_labels/dt={DAYS[0]}/quarantine.parquet", path)
    return pq.read_table(path).column("reason").to_pylist()


def _write(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _call(rid: str, kind: str, student_label: int | None, *, served_by: str = "student", train_id: str = TRAIN_ID,
          confidence: float = 0.9, feedback_json: str | None = None, model: str = "openai/teacher") -> dict:  # fmt: skip
    student = None
    if student_label is not None:
        student = json.dumps({"train_id": train_id, "label": student_label, "confidence": confidence})
    return {
        "request_id": rid, "task": "toxicity", "model": model, "input": f"text {rid}", "call_kind": kind,
        "served_by": served_by, "student": student, "feedback": feedback_json, "source_key": "k", "source_line": 1,
    }  # fmt: skip


def test_live_agreement_on_shadow_and_sample_pairs_with_intervals_and_deferred_apart(tmp_path):
    calls, labels = [], []
    # 40 shadow pairs (36 agree), 20 sample pairs (14 agree), 30 deferred (12 agree), 50 student-only.
    for i in range(40):
        calls.append(_call(f"sh{i}", "shadow", 1 if i < 36 else 0, served_by="teacher"))
        labels.append({"request_id": f"sh{i}", "label": 1, "source_key": "k", "source_line": i})
    for i in range(20):
        calls.append(_call(f"sa{i}", "sample", 0 if i < 14 else 1))
        labels.append({"request_id": f"sa{i}", "label": 0, "source_key": "k", "source_line": 100 + i})
    for i in range(30):
        calls.append(_call(f"de{i}", "deferred", 1 if i < 12 else 0, served_by="teacher", confidence=0.6))
        labels.append({"request_id": f"de{i}", "label": 1, "source_key": "k", "source_line": 200 + i})
    calls += [_call(f"st{i}", "student", 0) for i in range(50)]
    # A hostile answer: a label the task does not have pairs with nothing.
    calls.append(_call("bad", "sample", 7))
    labels.append({"request_id": "bad", "label": 0, "source_key": "k", "source_line": 999})
    records = _write(tmp_path / "records.parquet", calls)
    labelled = _write(tmp_path / "labels.parquet", labels)

    report = live.live_report(
        records, labelled, (0, 1), 1, tmp_path / "work", champion_train_id=TRAIN_ID, reference_agreement=0.95,
        train_prior=0.3,
    )  # fmt: skip
    (unbiased,) = report.agreement
    assert (unbiased.train_id, unbiased.pairs, unbiased.agreed, unbiased.biased) == (TRAIN_ID, 60, 50, False)
    expected = wilson(50, 60)
    assert (unbiased.low, unbiased.high) == (expected.low, expected.high)
    assert unbiased.low < 50 / 60 < unbiased.high and 0.71 < unbiased.low < 0.73 and 0.90 < unbiased.high < 0.91
    (deferred,) = report.deferred
    assert (deferred.pairs, deferred.agreed, deferred.biased) == (30, 12, True)
    assert report.invalid_student_answers == 1
    shares = {(t.call_kind, t.served_by): t.calls for t in report.traffic}
    assert shares == {("shadow", "teacher"): 40, ("sample", "student"): 21, ("deferred", "teacher"): 30,
                      ("student", "student"): 50}  # fmt: skip
    assert math.isclose(sum(t.share for t in report.traffic), 1.0)
    assert math.isclose(report.student_served_share, 71 / 141)
    # The teacher's rate leaves out the deferred calls: 40 of 61 shadow and sample labels are 1.
    assert (report.prior.teacher_rate.hits, report.prior.teacher_rate.n) == (40, 61)
    assert report.prior.em_prior is not None and report.prior.em_rows == 140

    # The signal: the interval's top (0.907) is 0.043 below 0.95, inside the 0.05 margin; against 0.99 it is not.
    config = MonitoringConfig(min_live_pairs=30)
    quiet = drift.live_agreement_signal(report, config)
    assert quiet is not None and not quiet.fired and quiet.value == pytest.approx(0.95 - unbiased.high)
    report.reference_agreement = 0.99
    assert drift.live_agreement_signal(report, config).fired
    # Too few pairs: reported, not judged, whatever the gap.
    assert not drift.live_agreement_signal(report, MonitoringConfig(min_live_pairs=61)).fired


def test_em_prior_recovers_the_traffic_share_from_calibrated_scores(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    # Traffic at 60% positives, scored by the exact posterior of a model fitted at a 30% prior:
    # x ~ N(+1, 1) for positives and N(-1, 1) for negatives, so P(positive | x) = sigmoid(2x + logit(prior)).
    positive = rng.random(2000) < 0.6
    x = rng.normal(np.where(positive, 1.0, -1.0), 1.0)
    p_at_train = 1 / (1 + np.exp(-(2 * x + np.log(0.3 / 0.7))))
    label = (p_at_train >= 0.5).astype(int)
    confidence = np.where(label == 1, p_at_train, 1 - p_at_train)
    calls = [_call(f"c{i}", "student", int(label[i]), confidence=float(confidence[i])) for i in range(2000)]
    report = live.live_report(
        _write(tmp_path / "records.parquet", calls), None, (0, 1), 1, tmp_path / "w", champion_train_id=TRAIN_ID,
        train_prior=0.3,
    )  # fmt: skip
    assert report.prior.em_rows == 2000 and abs(report.prior.em_prior - positive.mean()) < 0.05
    assert report.prior.teacher_rate is None


def test_feedback_stream_is_validated_quarantined_and_deduplicated(local_store):
    lines = [
        {"request_id": "a", "feedback": {"thumbs": "up"}, "timestamp": "2026-03-01T10:00:00Z"},
        {"request_id": "a", "feedback": {"thumbs": "down"}, "timestamp": "2026-03-01T11:00:00Z"},
        {"request_id": "b", "feedback": {"thumbs": "down", "regenerate": True}, "timestamp": "2026-03-01T10:00:00Z"},
        {"request_id": "b", "feedback": {"regenerate": True}, "timestamp": "2026-03-01T12:00:00Z"},
        {"request_id": "c", "feedback": {"thumbs": "sideways"}},
        {"request_id": "", "feedback": {"thumbs": "up"}},
        {"request_id": "d", "feedback": {"stars": 5}},
        {"request_id": "e", "feedback": {"thumbs": "up"}, "timestamp": "yesterday"},
        {"request_id": "f", "feedback": {"thumbs": "up"}, "schema_version": 9},
        ["not", "an", "object"],
    ]
    body = "\n".join(json.dumps(line) for line in lines) + "\n{truncated\n\n"
    local_store.put_bytes(feedback_object_key("2026-03-01", "app-1"), body.encode())
    late = json.dumps({"request_id": "a", "feedback": {"thumbs": "up"}, "timestamp": "2026-03-02T09:00:00+00:00"})
    local_store.put_bytes("feedback/dt=2026-03-02/app-1.jsonl.gz", gzip.compress((late + "\n").encode()))
    local_store.put_bytes("feedback/dt=2026-03-02/corrupt.jsonl.gz", b"not gzip at all")

    stream = feedback.read_feedback(local_store, ["2026-03-01", "2026-03-02"])
    assert (stream.objects, stream.lines_in, stream.quarantined) == (3, 14, 9)
    # lines in = lines with a verdict + quarantined; five verdict lines gave six (request, kind) verdicts, three left.
    verdicts = {(e["request_id"], e["kind"]): e["value"] for e in stream.events.to_pylist()}
    assert verdicts == {("a", "thumbs"): "up", ("b", "thumbs"): "down", ("b", "regenerate"): "true"}
    assert stream.duplicates == 3
    reasons = stream.reasons
    assert reasons["not valid JSON"] == 1 and reasons["blank line"] == 1 and reasons["not a JSON object"] == 1
    assert reasons["timestamp is not ISO 8601"] == 1 and reasons["unsupported schema_version 9"] == 1
    assert any(r.startswith("unreadable object") for r in reasons)
    assert any("thumbs must be one of up, down" in r for r in reasons)
    assert any("unknown feedback keys ['stars']" in r for r in reasons)
    assert any(r.startswith("request_id must be") for r in reasons)


def test_ab_rates_per_served_model_with_intervals_and_a_two_proportion_test(tmp_path):
    calls = [_call(f"t{i}", "teacher", None, served_by="teacher") for i in range(400)]
    calls += [_call(f"s{i}", "student", 0) for i in range(400)]
    # Inline: 8 teacher thumbs-downs, one regenerate written the older way; the stream adds the student's.
    for i in range(8):
        calls[i]["feedback"] = json.dumps({"thumbs": "down"})
    calls[10]["feedback"] = json.dumps({"regenerated": True})
    calls[400]["feedback"] = json.dumps({"thumbs": "up"})
    stamp = "2026-03-02T00:00:00+00:00"
    late = [{"request_id": f"s{i}", "kind": "thumbs", "value": "down", "timestamp": stamp} for i in range(30)]
    late.append({"request_id": "t0", "kind": "thumbs", "value": "up", "timestamp": stamp})
    events = pa.Table.from_pylist(
        [{**event, "source_key": "k", "source_line": i} for i, event in enumerate(late)], schema=feedback.EVENT_SCHEMA
    )
    rates = {r.model: r for r in feedback.feedback_rates(_write(tmp_path / "r.parquet", calls), events)}
    teacher, student = rates["openai/teacher"], rates[TRAIN_ID]
    # The stream's later thumbs-up replaces t0's inline thumbs-down; s0's stream verdict replaces its inline up.
    assert (teacher.served_by, teacher.calls, teacher.thumbs_down, teacher.thumbs_up, teacher.regenerated) == (
        "teacher", 400, 7, 1, 1)  # fmt: skip
    assert (student.served_by, student.calls, student.thumbs_down, student.thumbs_up) == ("student", 400, 30, 0)
    (comparison,) = feedback.ab_comparisons(list(rates.values()))
    test = comparison.thumbs_down
    assert (comparison.student, comparison.teacher) == (TRAIN_ID, "openai/teacher")
    assert test.difference == pytest.approx(23 / 400)
    # The pooled z-test by hand: p = 37/800.
    pooled = 37 / 800
    z = (30 / 400 - 7 / 400) / math.sqrt(pooled * (1 - pooled) * 2 / 400)
    assert test.z == pytest.approx(z) and test.p_value < 0.001 and test.significant()
    assert 0 < test.low < test.difference < test.high
    assert not comparison.regenerate.significant()
    markdown = feedback.ab_markdown([comparison])
    assert "worse" in markdown and "no difference shown" in markdown
    # Equal rates: no difference; an empty side: no test at all.
    assert two_proportion_test(wilson(5, 100), wilson(5, 100)).p_value == pytest.approx(1.0)
    assert two_proportion_test(wilson(0, 0), wilson(5, 100)).p_value == 1.0


def test_ab_report_asset_on_canary_traffic(local_store, task, instance):
    summary = _served_day(local_store, task, DAYS[0], rollout="canary")
    assert summary.feedback_events > 0 and summary.feedback_keys
    assert _materialize(["raw_logs"], local_store, task, instance, DAYS[0]).success
    result = _materialize(["ab_report"], local_store, task, instance, DAYS[0])
    assert result.success
    (materialization,) = result.asset_materializations_for_node("ab_report")
    metadata = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
    assert isinstance(metadata[f"thumbs_down_rate_{TRAIN_ID}"], float)
    assert isinstance(metadata["thumbs_down_rate_openai_gpt-4-1106-preview"], float)
    assert 0.0 <= metadata[f"thumbs_down_p_value_{TRAIN_ID}_vs_openai_gpt-4-1106-preview"] <= 1.0
    assert "| student |" in metadata["summary"] or "student" in metadata["summary"]
    report = read_report(local_store, ab_report_prefix(DAYS[0]))
    assert report is not None and report["stream"]["lines_in"] == summary.feedback_events
    assert sum(r["calls"] for r in report["rates"]) == metadata["dagster/row_count"]


def test_retraining_sensor_fires_once_when_the_served_student_slips(local_store, task, instance):
    champion = {
        "adapter_prefix": f"students/adapters/size=100pct/{TRAIN_ID}/",
        "train_id": TRAIN_ID,
        "train_size": "100pct",
        "metrics": {"in_distribution": {"agreement": 0.92, "accuracy": 0.92}},
    }
    local_store.put_bytes(CHAMPION_CURRENT, json.dumps(champion).encode())

    def tick(cursor: str | None) -> dg.SensorResult | dg.SkipReason:
        return drift_retraining_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))

    _served_day(local_store, task, DAYS[0], agreement=0.93)
    assert _materialize(["raw_logs", "teacher_labels", "drift_report"], local_store, task, instance, DAYS[0]).success
    healthy = tick(None)
    assert isinstance(healthy, dg.SensorResult) and healthy.run_requests == []
    report = read_report(local_store, drift_report_prefix(DAYS[0]))
    (cell,) = report["live"]["agreement"]
    assert cell["train_id"] == TRAIN_ID and cell["pairs"] >= task.monitoring.min_live_pairs
    assert report["shadow"] is None and any("replaced by live agreement" in note for note in report["notes"])

    _served_day(local_store, task, DAYS[1], agreement=0.6)
    assert _materialize(["raw_logs", "teacher_labels", "drift_report"], local_store, task, instance, DAYS[1]).success
    fired = tick(healthy.cursor)
    assert isinstance(fired, dg.SensorResult)
    (request,) = fired.run_requests
    assert request.tags[TRIGGER_TAG] == "drift" and request.tags[DRIFT_SIGNAL_TAG] == drift.LIVE_AGREEMENT_DROP
    assert request.tags["distill/drift_day"] == DAYS[1]
    # A replayed tick names the same run (launched at most once); the next tick asks for nothing.
    replay = tick(healthy.cursor)
    assert isinstance(replay, dg.SensorResult) and replay.run_requests[0].run_key == request.run_key
    assert isinstance(tick(fired.cursor), dg.SkipReason)


def test_served_traffic_is_the_same_calls_as_teacher_only_traffic(task):
    plain = generate_traffic(days=[DAYS[0]], records_per_day=300, seed=2, task=task)
    served = generate_traffic(
        days=[DAYS[0]], records_per_day=300, seed=2, task=task, profile=TrafficProfile(rollout="hybrid")
    )
    for column in ("request_id", "user_id", "input", "true_label"):
        assert served[column].equals(plain[column])
    kinds = served["call_kind"].to_pylist()
    # hybrid: the unsure calls go to the teacher; the student answers the rest, a share of them sampled.
    assert {"deferred", "student", "sample"} <= set(kinds) <= {"deferred", "student", "sample", "fallback"}
    responses = served["response"].to_pylist()
    assert all(r is None for r, k in zip(responses, kinds, strict=True) if k == "student")
    with pytest.raises(ValueError, match="rollout"):
        TrafficProfile(rollout="everywhere")
