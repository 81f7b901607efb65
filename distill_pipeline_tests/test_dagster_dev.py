"""The sensors and automation for real: `dagster dev` (webserver and daemon) on loopback.

Log objects dropped into the store become an ingestion run of their day by the fresh-logs
sensor, the later stages follow by automation, and a day of drifted traffic (a share of comments
in Spanish) makes the drift report fire and the retraining sensor launch one re-distillation run.
The run is seen to start, not awaited: training and the promotion gate have their own tests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from distill_pipeline.core.layout import drift_report_prefix, train_set_prefix
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.tables import read_manifest, read_report
from distill_pipeline.core.task import load_task
from distill_pipeline.defs.monitoring.jobs import DRIFT_DAY_TAG, DRIFT_SIGNAL_TAG, DRIFT_VALUE_TAG, REDISTILL_JOB
from distill_pipeline.demo.simulator import TrafficProfile, simulate_traffic
from distill_pipeline_tests.dagster_dev import REPO_ROOT, running_dagster_dev, utc_days_back, write_tiny_task

ARTIFACTS = REPO_ROOT / "artifacts" / "dagster_dev"
ROWS_PER_DAY = 400
SENSOR_INTERVAL_S = 5


def _drop_logs(store: LocalStore, task_dir: Path, day: str, seed: int, spanish: float = 0.0) -> None:
    simulate_traffic(
        store,
        days=[day],
        records_per_day=ROWS_PER_DAY,
        seed=seed,
        task=load_task(task_dir),
        profile=TrafficProfile(records_per_object=ROWS_PER_DAY, spanish_share=spanish),
    )


@pytest.mark.slow
def test_fresh_logs_flow_through_and_drift_starts_one_retraining_run(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    task_dir = write_tiny_task(tmp_path / "task", sensor_interval_s=SENSOR_INTERVAL_S)
    normal_day, drifted_day = utc_days_back(2, 1)
    env = {
        "DISTILL_STORE": str(store.root),
        "DISTILL_TASK": str(task_dir),
        "DISTILL_FIRST_DAY": utc_days_back(7)[0],
        "DISTILL_WORK_DIR": str(tmp_path / "train"),
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_dagster_dev(tmp_path, env) as dev:
        # New log objects: the sensor launches the day's ingestion; curation, test and training
        # sets and the day's drift report follow by automation.
        _drop_logs(store, task_dir, normal_day, seed=1)
        ingest = dev.wait_for_run({"distill/trigger": "fresh_logs", "dagster/partition": normal_day}, 240)
        assert ingest["tags"]["dagster/sensor_name"] == "fresh_logs_sensor"
        assert read_manifest(store, f"tables/teacher_labels/dt={normal_day}/") is not None
        dev.wait_for("the training set by automation", lambda: read_manifest(store, train_set_prefix("100pct")), 300)

        # Drifted traffic: the drift report fires and one re-distillation run starts, tagged with the signal.
        _drop_logs(store, task_dir, drifted_day, seed=2, spanish=0.5)
        drifted = dev.wait_for(
            "the drifted day's report", lambda: read_report(store, drift_report_prefix(drifted_day)), 300
        )
        (ARTIFACTS / f"drift_report_{drifted_day}.json").write_text(json.dumps(drifted, indent=2))
        assert drifted["drifting"] is True, drifted["signals"]
        fired = {s["name"] for s in drifted["signals"] if s["fired"]}
        retraining = dev.wait_for("a retraining run", lambda: dev.runs({"distill/trigger": "drift"}) or None, 120)
        (run,) = retraining
        assert run["jobName"] == REDISTILL_JOB
        assert run["tags"][DRIFT_SIGNAL_TAG] in fired and run["tags"][DRIFT_DAY_TAG] == drifted_day
        assert float(run["tags"][DRIFT_VALUE_TAG]) > 0
        assert run["tags"]["dagster/partition"] == "100pct|base"
        dev.wait_for(
            "the retraining run to start",
            lambda: dev.runs({"distill/trigger": "drift"})[0]["status"] in ("STARTED", "SUCCESS", "FAILURE") or None,
            120,
        )

        # A few more sensor ticks launch nothing more.
        time.sleep(3 * SENSOR_INTERVAL_S)

        # Ingestion ran for both days, never more often than a day has log objects (a tick may fall
        # between two uploads), and the drift event made exactly one retraining run.
        fresh = dev.runs({"distill/trigger": "fresh_logs"})
        assert {r["tags"]["dagster/partition"] for r in fresh} == {normal_day, drifted_day}
        for day in (normal_day, drifted_day):
            objects = len(store.list(f"logs/dt={day}/"))
            assert 1 <= sum(r["tags"]["dagster/partition"] == day for r in fresh) <= objects
        assert len(dev.runs({"distill/trigger": "drift"})) == 1
