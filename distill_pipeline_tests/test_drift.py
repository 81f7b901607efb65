"""Drift statistics, drift events and fresh-log detection: the plain functions behind the monitoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.store import ObjectInfo
from distill_pipeline.core.task import MonitoringConfig, TaskConfigError, load_task
from distill_pipeline.demo.simulator import TrafficProfile, generate_traffic
from distill_pipeline.logs.freshness import log_day, scan_for_fresh_days
from distill_pipeline.monitoring import drift
from distill_pipeline.monitoring.feedback import feedback_rates


@pytest.fixture(scope="module")
def traffic() -> dict[str, list[str]]:
    """A reference day, another day of the same traffic, and a day where 40% of comments are Spanish."""
    task = load_task()

    def day(name: str, spanish: float) -> list[str]:
        table = generate_traffic(
            days=[name], records_per_day=1200, seed=3, task=task, profile=TrafficProfile(spanish_share=spanish)
        )
        return table.column("input").to_pylist()

    return {
        "reference": day("2026-03-01", 0.0),
        "same": day("2026-03-02", 0.0),
        "shifted": day("2026-03-03", 0.4),
    }


def test_length_psi_flags_a_shifted_length_distribution_only() -> None:
    rng = np.random.default_rng(0)
    reference = rng.lognormal(4.0, 0.5, 2000)
    assert drift.population_stability_index(reference, rng.lognormal(4.0, 0.5, 2000)) < 0.05
    assert drift.population_stability_index(reference, rng.lognormal(4.8, 0.5, 2000)) > 0.25
    # Values outside the reference's range land in the outer bins instead of being lost.
    assert drift.population_stability_index(reference, np.full(500, 1e6)) > 5
    with pytest.raises(ValueError):
        drift.population_stability_index([], [1.0])


def test_vocabulary_drift_sees_a_new_language_and_not_a_new_day(traffic: dict[str, list[str]]) -> None:
    reference = drift.seeded_sample(traffic["reference"], 400, 1)
    same = drift.vocabulary_drift(reference, drift.seeded_sample(traffic["same"], 400, 2))
    shifted = drift.vocabulary_drift(reference, drift.seeded_sample(traffic["shifted"], 400, 2))
    config = MonitoringConfig()
    assert same.increase < config.max_oov_increase
    assert shifted.increase > config.max_oov_increase
    assert {"de", "la", "el"} & set(shifted.top_new_words)
    assert drift.words("Qué comentario, ÁRBITRO!") == ["qué", "comentario", "árbitro"]


def test_mmd_permutation_test_separates_shifted_samples_from_unshifted() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 16))
    same = drift.mmd_permutation_test(x, rng.normal(size=(120, 16)), permutations=200, seed=0)
    shifted = drift.mmd_permutation_test(x, rng.normal(0.5, 1.0, size=(120, 16)), permutations=200, seed=0)
    assert same.p_value > 0.05
    assert shifted.p_value < 0.01 and shifted.mmd2 > same.mmd2
    # The +1 correction: never exactly zero.
    assert shifted.p_value >= 1 / 201
    with pytest.raises(ValueError):
        drift.mmd_permutation_test(x[:1], x, permutations=10, seed=0)


@pytest.mark.slow
def test_embedding_drift_with_the_packaged_encoder(traffic: dict[str, list[str]]) -> None:
    n = 80
    texts = [
        *drift.seeded_sample(traffic["reference"], n, 1),
        *drift.seeded_sample(traffic["same"], n, 2),
        *drift.seeded_sample(traffic["shifted"], n, 3),
    ]
    embeddings = drift.embed_texts(texts)
    assert embeddings.shape == (3 * n, 384)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    reference, same, shifted = embeddings[:n], embeddings[n : 2 * n], embeddings[2 * n :]
    config = MonitoringConfig()
    unshifted = drift.mmd_permutation_test(reference, same, permutations=200, seed=0)
    moved = drift.mmd_permutation_test(reference, shifted, permutations=200, seed=0)
    assert not (unshifted.p_value < config.embedding_alpha and unshifted.mmd2 > config.min_embedding_mmd)
    assert moved.p_value < config.embedding_alpha and moved.mmd2 > config.min_embedding_mmd


def test_signals_fire_on_their_thresholds_and_not_on_a_small_day() -> None:
    report = drift.DriftReport("2026-03-03", 500, "ref", 1000)
    report.length = drift.LengthDrift(0.4, 0.3, 1e-9, 80, 40)
    report.vocabulary = drift.VocabularyDrift(0.05, 0.04, 0.01, 100, [])
    report.embedding = drift.EmbeddingDrift(0.5, 0.2, 100, (50, 50))  # large but not significant
    report.label_rate = drift.LabelRateDrift(0.1, 0.3, 0.2)
    report.shadow = drift.ShadowEvaluation(100, 0.9, 0.7, 0.92, 0.02, "abc")
    config = MonitoringConfig()
    fired = {s.name for s in drift.evaluate_signals(report, config) if s.fired}
    assert fired == {drift.LENGTH_PSI, drift.LABEL_RATE_SHIFT}
    report.rows = config.min_rows - 1
    assert not any(s.fired for s in drift.evaluate_signals(report, config))


def _observed(storage_id: int, day: str, *fired: tuple[str, float, float]) -> drift.ObservedReport:
    return drift.ObservedReport(storage_id, day, [drift.DriftSignal(n, v, t, True) for n, v, t in fired])


def test_one_event_per_stretch_of_drift_whatever_the_backlog() -> None:
    healthy = _observed(1, "2026-03-01")
    first = _observed(2, "2026-03-02", (drift.LENGTH_PSI, 0.3, 0.25), (drift.OOV_INCREASE, 0.4, 0.1))
    backlog = [healthy, first, *(_observed(i, f"2026-03-{i:02d}", (drift.OOV_INCREASE, 0.5, 0.1)) for i in (3, 4, 5))]
    event, still_open = drift.next_drift_event(False, backlog)
    assert event is not None and still_open
    # The first drifting report opens the event; its worst signal relative to the threshold is named.
    assert (event.day, event.signal, event.value, event.run_key) == (
        "2026-03-02",
        drift.OOV_INCREASE,
        0.4,
        "drift-2026-03-02-2",
    )
    # Still drifting on the next tick: the same event, nothing new.
    assert drift.next_drift_event(True, [_observed(6, "2026-03-06", (drift.OOV_INCREASE, 0.5, 0.1))]) == (None, True)
    # Healthy again, then drifting: a new event.
    event, still_open = drift.next_drift_event(
        True, [_observed(7, "2026-03-07"), _observed(8, "2026-03-08", (drift.AGREEMENT_DROP, 0.2, 0.08))]
    )
    assert event is not None and event.storage_id == 8 and still_open
    assert drift.next_drift_event(False, []) == (None, False)


def test_signals_read_back_from_report_metadata() -> None:
    metadata = {
        "signals": {
            drift.LENGTH_PSI: {"value": 0.1, "threshold": 0.25, "fired": False},
            drift.OOV_INCREASE: {"value": 0.3, "threshold": 0.1, "fired": True, "detail": ""},
        }
    }
    (signal,) = drift.signals_from_metadata(metadata)
    assert (signal.name, signal.value, signal.threshold) == (drift.OOV_INCREASE, 0.3, 0.1)
    assert drift.signals_from_metadata({}) == []


def test_feedback_rates_per_model(tmp_path: Path) -> None:
    feedback = [
        json.dumps({"thumbs": "up"}),
        json.dumps({"thumbs": "down"}),
        json.dumps({"regenerated": True}),
        None,
        json.dumps({"thumbs": "DOWN", "comment": "wrong"}),
        None,
    ]
    models = ["teacher-a", "teacher-a", "teacher-a", "teacher-a", "teacher-b", "teacher-b"]
    path = tmp_path / "records.parquet"
    ids = [f"r{i}" for i in range(len(models))]
    pq.write_table(pa.table({"request_id": ids, "model": models, "feedback": feedback}), path)
    # A version 1 table (no serving columns): every call is the teacher's.
    rates = {r.model: r for r in feedback_rates(path)}
    assert (rates["teacher-a"].calls, rates["teacher-a"].with_feedback) == (4, 3)
    assert (rates["teacher-a"].thumbs_up, rates["teacher-a"].thumbs_down, rates["teacher-a"].regenerated) == (1, 1, 1)
    assert rates["teacher-b"].thumbs_down_rate == 0.5 and rates["teacher-b"].regenerate_rate == 0.0
    assert {r.served_by for r in rates.values()} == {"teacher"}


def test_report_renders_with_history_plots() -> None:
    report = drift.DriftReport("2026-03-02", 300, "champion training set (100pct)", 900)
    report.length = drift.LengthDrift(0.3, 0.2, 1e-5, 80, 60)
    report.feedback = [drift.FeedbackRates("openai/gpt-4", 300, 3, 2, 1, 0)]
    report.signals = drift.evaluate_signals(report, MonitoringConfig())
    markdown = drift.report_markdown(report)
    assert "**Drifting**: length_psi" in markdown and "openai/gpt-4" in markdown
    history = [report.to_dict(), {**report.to_dict(), "day": "2026-03-03"}]
    assert drift.signal_history_markdown(history).startswith("![Drift signals over time](data:image/png;base64,")
    assert drift.feedback_history_markdown(history).startswith("![User feedback over time](data:image/png;base64,")
    assert drift.feedback_history_markdown([]) == "_no feedback logged_"


def _info(key: str, version: str = "v1") -> ObjectInfo:
    return ObjectInfo(key, 10, version, 0.0)


def test_fresh_days_from_new_and_rewritten_objects_with_stable_run_keys() -> None:
    listing = [
        _info("logs/dt=2026-03-01/a.jsonl"),
        _info("logs/dt=2026-03-01/b.jsonl.gz"),
        _info("logs/dt=2026-03-02/a.jsonl"),
        _info("logs/dt=2026-03-02/.tmp-upload"),
        _info("logs/README.md"),
        _info("logs/dt=2031-01-01/a.jsonl"),  # no partition yet
    ]
    first = scan_for_fresh_days(listing, None, first_day="2024-01-01", last_day="2026-12-31")
    assert [(f.day, f.objects, f.first_seen) for f in first.fresh] == [("2026-03-01", 2, True), ("2026-03-02", 1, True)]
    assert first.skipped_days == ["2031-01-01"]
    # Replaying the same listing, from the old cursor (a replayed tick) or the new one, gives the same keys or nothing.
    replay = scan_for_fresh_days(listing, None, first_day="2024-01-01", last_day="2026-12-31")
    assert [f.run_key for f in replay.fresh] == [f.run_key for f in first.fresh]
    assert scan_for_fresh_days(listing, first.cursor, first_day="2024-01-01", last_day="2026-12-31").fresh == []
    # A new object and a rewritten one: both days are fresh again, under new keys.
    changed = [*listing, _info("logs/dt=2026-03-01/c.jsonl")]
    changed[2] = _info("logs/dt=2026-03-02/a.jsonl", "v2")
    later = scan_for_fresh_days(changed, first.cursor, first_day="2024-01-01", last_day="2026-12-31")
    assert [(f.day, f.new_objects, f.first_seen) for f in later.fresh] == [
        ("2026-03-01", 1, False),
        ("2026-03-02", 0, False),
    ]
    assert not {f.run_key for f in later.fresh} & {f.run_key for f in first.fresh}
    # A corrupt cursor counts as a first look rather than failing the sensor.
    assert len(scan_for_fresh_days(listing, "{not json", first_day="2024-01-01", last_day="2026-12-31").fresh) == 2


def test_log_day_accepts_only_log_objects() -> None:
    assert log_day("logs/dt=2026-03-01/x.jsonl") == "2026-03-01"
    assert log_day("logs/dt=2026-03-01/sub/x.jsonl") is None
    assert log_day("logs/dt=2026-3-1/x.jsonl") is None
    assert log_day("tables/raw_logs/dt=2026-03-01/records.parquet") is None


def test_monitoring_configuration_is_validated(tmp_path: Path) -> None:
    assert load_task().monitoring == MonitoringConfig()
    with pytest.raises(TaskConfigError):
        MonitoringConfig(sample_rows=0)
