"""The monitoring layer in-process: the sensors with their cursors, the automation conditions, the drift report."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from distill_pipeline.core.layout import CHAMPION_CURRENT, drift_report_prefix
from distill_pipeline.core.published import LoraAdapters
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.tables import read_report
from distill_pipeline.core.task import BUILTIN_TASKS_DIR, Task, load_task
from distill_pipeline.definitions import defs as load_defs
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.data import splits as split_assets
from distill_pipeline.defs.data.curation import curated_examples
from distill_pipeline.defs.data.ingest import raw_logs
from distill_pipeline.defs.logs.assets import teacher_logs
from distill_pipeline.defs.logs.sensors import fresh_logs_sensor
from distill_pipeline.defs.monitoring.assets import drift_report
from distill_pipeline.defs.monitoring.jobs import (
    DRIFT_SIGNAL_TAG,
    DRIFT_VALUE_TAG,
    TRIGGER_TAG,
    retrain_partition_key,
    retrain_size_key,
)
from distill_pipeline.defs.monitoring.schedules import redistill_schedule
from distill_pipeline.defs.monitoring.sensors import drift_retraining_sensor
from distill_pipeline.defs.students.assets import lora_adapter
from distill_pipeline.defs.teachers.labelling import teacher_labels
from distill_pipeline.demo.simulator import TrafficProfile, simulate_traffic
from distill_pipeline.monitoring import drift

DAYS = ["2026-03-01", "2026-03-02", "2026-03-03"]
DATA_ASSETS = [
    teacher_logs,
    raw_logs,
    teacher_labels,
    curated_examples,
    split_assets.test_sets,
    split_assets.train_sets,
]


def tiny_task(folder: Path, **overrides: str) -> Task:
    """The toxicity task sized for a few hundred rows, with quick drift statistics."""
    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    text = (folder / "task.toml").read_text()
    text = text.replace("in_distribution_test_size = 500", "in_distribution_test_size = 60")
    text = text.replace("balanced_test_size = 200", "balanced_test_size = 30")
    for key, value in overrides.items():
        section, name = key.split(".")
        line = re.compile(rf"^{name} = .*$", re.MULTILINE)
        if line.search(text):
            text = line.sub(f"{name} = {value}", text, count=1)
        else:
            text = text.replace(f"[{section}]\n", f"[{section}]\n{name} = {value}\n", 1)
    # The fixed days below lie months back: the fresh-logs sensor's window reaches them.
    text += (
        "\n[monitoring]\nsample_rows = 200\nembedding_rows = 60\npermutations = 100\nmin_rows = 30\nshadow_rows = 60\n"
        f"fresh_log_days = {(dt.date.today() - dt.date.fromisoformat(DAYS[0])).days + 2}\n"
    )
    (folder / "task.toml").write_text(text)
    return load_task(folder)


@pytest.fixture
def task(tmp_path: Path) -> Task:
    return tiny_task(tmp_path / "task")


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def _resources(store: LocalStore, task: Task) -> dict[str, object]:
    """The code location's resources (the teacher, the trainer...) on a test store and task."""
    return {**load_defs().resources, "store": StoreResource(url=store.url), "task": TaskResource(name=str(task.source))}


def _materialize(
    assets: list, selection: list[str], store: LocalStore, task: Task, instance: dg.DagsterInstance, partition=None
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        selection=selection,
        partition_key=partition,
        resources=_resources(store, task),
        instance=instance,
        raise_on_error=False,
    )


def _simulate(store: LocalStore, task: Task, day: str, rows: int = 400, spanish: float = 0.0) -> None:
    simulate_traffic(
        store,
        days=[day],
        records_per_day=rows,
        seed=11,
        task=task,
        profile=TrafficProfile(records_per_object=rows, spanish_share=spanish),
    )


def test_fresh_logs_sensor_requests_each_new_day_once(
    local_store: LocalStore, task: Task, instance: dg.DagsterInstance
) -> None:
    _simulate(local_store, task, DAYS[0])
    _simulate(local_store, task, DAYS[1])
    resources = {"store": StoreResource(url=local_store.url), "task": TaskResource(name=str(task.source))}

    first = fresh_logs_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert [(r.partition_key, r.tags[TRIGGER_TAG]) for r in first.run_requests] == [
        (DAYS[0], "fresh_logs"),
        (DAYS[1], "fresh_logs"),
    ]
    assert all(r.run_key.startswith(f"logs-{r.partition_key}-") for r in first.run_requests)
    # A replayed tick (the old cursor) asks for the same run keys, which Dagster launches at most once;
    # the advanced cursor asks for nothing.
    replayed = fresh_logs_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert [r.run_key for r in replayed.run_requests] == [r.run_key for r in first.run_requests]
    quiet = fresh_logs_sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=first.cursor))
    assert quiet.run_requests == []

    # New objects for one day: only that day, under a new key.
    simulate_traffic(local_store, days=[DAYS[1]], records_per_day=50, seed=12, task=task)
    later = fresh_logs_sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=first.cursor))
    assert [r.partition_key for r in later.run_requests] == [DAYS[1]]
    assert later.run_requests[0].run_key not in {r.run_key for r in first.run_requests}

    # A sensor that lost its cursor skips the days whose objects are already ingested.
    assert _materialize(DATA_ASSETS, ["raw_logs"], local_store, task, instance, DAYS[0]).success
    fresh_start = fresh_logs_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert [r.partition_key for r in fresh_start.run_requests] == [DAYS[1]]


def test_fresh_logs_sensor_lists_only_its_window_of_recent_days(
    local_store: LocalStore, tmp_path: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = tiny_task(tmp_path / "window_task")
    text = (task.source / "task.toml").read_text()
    (task.source / "task.toml").write_text(re.sub(r"^fresh_log_days = .*$", "fresh_log_days = 3", text, flags=re.M))
    today = dt.datetime.now(dt.UTC).date()
    recent, old = (today - dt.timedelta(days=1)).isoformat(), (today - dt.timedelta(days=30)).isoformat()
    _simulate(local_store, task, recent, rows=50)
    _simulate(local_store, task, old, rows=50)
    listed: list[str] = []
    real_list = LocalStore.list
    monkeypatch.setattr(LocalStore, "list", lambda self, prefix: listed.append(prefix) or real_list(self, prefix))
    resources = {"store": StoreResource(url=local_store.url), "task": TaskResource(name=str(task.source))}

    result = fresh_logs_sensor(dg.build_sensor_context(instance=instance, resources=resources))

    assert [r.partition_key for r in result.run_requests] == [recent]
    # Three prefixes, one a day, however many days the store holds.
    assert listed == [f"logs/dt={(today - dt.timedelta(days=back)).isoformat()}/" for back in (2, 1, 0)]


def test_automation_follows_ingestion_and_waits_for_blocking_checks(
    local_store: LocalStore, tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    task = tiny_task(tmp_path / "task")
    definitions = load_defs()
    automated = dg.AssetSelection.assets("curated_examples", "test_sets", "train_sets", "drift_report")
    initial = dg.evaluate_automation_conditions(defs=definitions, instance=instance, asset_selection=automated)
    assert initial.total_requested == 0

    _simulate(local_store, task, DAYS[0])
    ingest = _materialize(DATA_ASSETS, ["raw_logs", "teacher_labels"], local_store, task, instance, DAYS[0])
    assert ingest.success
    after_ingest = dg.evaluate_automation_conditions(
        defs=definitions, instance=instance, asset_selection=automated, cursor=initial.cursor
    )
    assert after_ingest.get_num_requested(curated_examples.key) == 1
    assert after_ingest.get_requested_partitions(drift_report.key) == {DAYS[0]}
    # The frozen test sets may follow in the same run; the training sets wait for both.
    assert after_ingest.get_num_requested(split_assets.test_sets.key) == 1
    assert after_ingest.get_num_requested(split_assets.train_sets.key) == 0
    settled = dg.evaluate_automation_conditions(
        defs=definitions, instance=instance, asset_selection=automated, cursor=after_ingest.cursor
    )
    assert settled.total_requested == 0

    assert _materialize(DATA_ASSETS, ["curated_examples", "test_sets"], local_store, task, instance).success
    after_curation = dg.evaluate_automation_conditions(
        defs=definitions, instance=instance, asset_selection=automated, cursor=settled.cursor
    )
    sizes = split_assets.train_sets.partitions_def.get_partition_keys()
    assert after_curation.get_requested_partitions(split_assets.train_sets.key) == set(sizes)
    assert after_curation.get_num_requested(curated_examples.key) == 0

    # New curated data leaves the frozen test sets as they are.
    assert _materialize(DATA_ASSETS, ["curated_examples"], local_store, task, instance).success
    recurated = dg.evaluate_automation_conditions(
        defs=definitions, instance=instance, asset_selection=automated, cursor=after_curation.cursor
    )
    assert recurated.get_num_requested(split_assets.test_sets.key) == 0

    # A day whose teacher answers fail the blocking parse check stops the flow there.
    strict = tiny_task(tmp_path / "strict", **{"checks.max_parse_failure_rate": "0.0"})
    _simulate(local_store, strict, DAYS[1])
    failed = _materialize(DATA_ASSETS, ["raw_logs", "teacher_labels"], local_store, strict, instance, DAYS[1])
    assert not failed.success
    blocked = dg.evaluate_automation_conditions(
        defs=definitions, instance=instance, asset_selection=automated, cursor=recurated.cursor
    )
    assert blocked.get_num_requested(curated_examples.key) == 0
    assert DAYS[1] not in blocked.get_requested_partitions(drift_report.key)


def _report_drift(instance: dg.DagsterInstance, day: str, fired: dict[str, float]) -> None:
    signals = {
        name: {"value": fired.get(name, 0.0), "threshold": 0.1, "fired": name in fired, "detail": ""}
        for name in drift.SIGNALS
    }
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=drift_report.key, partition=day, metadata={"signals": dg.MetadataValue.json(signals)}
        )
    )


def test_retraining_sensor_fires_once_per_drift_event(instance: dg.DagsterInstance) -> None:
    def tick(cursor: str | None) -> dg.SensorResult | dg.SkipReason:
        return drift_retraining_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))

    assert isinstance(tick(None), dg.SkipReason)
    _report_drift(instance, DAYS[0], {})
    healthy = tick(None)
    assert isinstance(healthy, dg.SensorResult) and healthy.run_requests == []

    # A backlog after a pause: three drifting days give one run, for the first of them.
    for day in DAYS:
        _report_drift(instance, day, {drift.OOV_INCREASE: 0.35, drift.LENGTH_PSI: 0.12})
    fired = tick(healthy.cursor)
    assert isinstance(fired, dg.SensorResult)
    (request,) = fired.run_requests
    assert request.partition_key == retrain_partition_key() == f"{retrain_size_key()}|base"
    assert request.tags[TRIGGER_TAG] == "drift"
    assert (request.tags[DRIFT_SIGNAL_TAG], request.tags[DRIFT_VALUE_TAG]) == (drift.OOV_INCREASE, "0.35")
    assert request.tags["distill/drift_day"] == DAYS[0]
    # Replaying the tick from the old cursor names the same run (launched at most once).
    replay = tick(healthy.cursor)
    assert isinstance(replay, dg.SensorResult) and replay.run_requests[0].run_key == request.run_key

    # Still drifting: no new run. Healthy, then drifting again: a new event.
    _report_drift(instance, "2026-03-04", {drift.OOV_INCREASE: 0.4})
    ongoing = tick(fired.cursor)
    assert isinstance(ongoing, dg.SensorResult) and ongoing.run_requests == []
    _report_drift(instance, "2026-03-05", {})
    _report_drift(instance, "2026-03-06", {drift.AGREEMENT_DROP: 0.2})
    again = tick(ongoing.cursor)
    assert isinstance(again, dg.SensorResult)
    (second,) = again.run_requests
    assert second.tags[DRIFT_SIGNAL_TAG] == drift.AGREEMENT_DROP and second.run_key != request.run_key


def test_redistill_schedule_targets_the_configured_size() -> None:
    context = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 3, 1, 3))
    request = redistill_schedule(context)
    assert request.partition_key == retrain_partition_key() == "100pct|base"
    assert request.run_key == "redistill-2026-03-01T03:00:00" and request.tags[TRIGGER_TAG] == "schedule"
    job = load_defs().resolve_job_def("redistill_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
        "lora_adapter",
        "eval_report",
        "champion",
    }


@pytest.mark.slow
def test_drift_report_detects_injected_drift_and_shadow_evaluates_the_champion(
    local_store: LocalStore, tmp_path: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A student that trains in seconds: the shadow evaluation needs a champion, not a good one.
    task = tiny_task(
        tmp_path / "task",
        **{"student.min_train_steps": "4", "student.max_length_cap": "16", "student.batch_size": "16"},
    )
    monkeypatch.setenv("DISTILL_WORK_DIR", str(tmp_path / "train"))
    assets = [*DATA_ASSETS, drift_report, lora_adapter]
    for day, spanish in zip(DAYS, (0.0, 0.0, 0.5), strict=True):
        _simulate(local_store, task, day, spanish=spanish)
        assert _materialize(assets, ["raw_logs", "teacher_labels"], local_store, task, instance, day).success
    assert _materialize(assets, ["curated_examples"], local_store, task, instance).success

    # The normal day before any champion: against the curated pool, no drift, no shadow.
    normal, normal_checks = _drift_report(assets, local_store, task, instance, DAYS[1])
    assert normal["reference"] == "curated_examples (no champion yet)"
    assert normal["drifting"] is False, normal["fired_signals"]
    assert all(normal_checks.values())
    published = read_report(local_store, drift_report_prefix(DAYS[1]))
    assert published is not None and published["shadow"] is None
    assert "no champion yet: no shadow evaluation" in published["notes"]

    # A champion: the drifted day is compared with its training set (less the day's own rows,
    # which the curated pool took in) and labelled by it in the shadow.
    for asset, partition in (("test_sets", None), ("train_sets", "100pct"), ("lora_adapter", "100pct|base")):
        assert _materialize(assets, [asset], local_store, task, instance, partition).success, asset
    adapter = LoraAdapters(local_store).current("100pct")
    assert adapter is not None
    champion = {
        "adapter_prefix": adapter["prefix"],
        "train_id": adapter["train_id"],
        "train_size": "100pct",
        "metrics": {"in_distribution": {"accuracy": 0.9, "agreement": 0.9}},
    }
    local_store.put_bytes(CHAMPION_CURRENT, json.dumps(champion).encode())
    shifted, shifted_checks = _drift_report(assets, local_store, task, instance, DAYS[2])
    assert shifted["reference"] == "champion training set (100pct)"
    assert shifted["drifting"] is True
    assert {"oov_rate_increase", "embedding_mmd"} <= set(shifted["fired_signals"].split(", "))
    assert (shifted_checks["input_drift"], shifted_checks["output_drift"]) == (False, True)
    assert shifted["oov_rate_increase"] > 0.1 > normal["oov_rate_increase"]
    assert isinstance(shifted["thumbs_down_rate_openai_gpt-4-1106-preview"], float)
    assert shifted["signals_over_time"].startswith("![Drift signals over time](data:image/png;base64,")
    published = read_report(local_store, drift_report_prefix(DAYS[2]))
    assert published is not None and published["drifting"] is True
    shadow = published["shadow"]
    assert shadow["champion_train_id"] == adapter["train_id"]
    assert shadow["rows"] == task.monitoring.shadow_rows
    assert 0.0 <= shadow["agreement"] <= 1.0 and shadow["reference_agreement"] == 0.9
    assert shifted["shadow_agreement"] == shadow["agreement"]
    assert shadow["drop"] == pytest.approx(0.9 - shadow["agreement"])
    assert drift.AGREEMENT_DROP in {s["name"] for s in published["signals"]}


def _drift_report(
    assets: list, store: LocalStore, task: Task, instance: dg.DagsterInstance, day: str
) -> tuple[dict[str, object], dict[str, bool]]:
    result = _materialize(assets, ["drift_report"], store, task, instance, day)
    assert result.success
    (materialization,) = result.asset_materializations_for_node("drift_report")
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}, checks
