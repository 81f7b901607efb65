"""The README's main command, end to end in a fresh directory, as a user runs it: the data stages, then the whole graph."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from distill_pipeline.main_job import recent_days


@pytest.mark.slow
def test_demo_materialises_every_data_stage_and_records_runs(tmp_path: Path) -> None:
    executable = shutil.which("distill-pipeline")
    assert executable, "the distill-pipeline command is not installed"
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "DISTILL_STORE", "DISTILL_TASK")}
    completed = subprocess.run(
        [executable, "demo", "--days", "2", "--records-per-day", "2500", "--stages", "data"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    out = completed.stdout
    # Progress: one line per step, then the summary table.
    assert "[1/12] raw_logs" in out and "[12/12] train_sets 100pct" in out
    for stage in ("raw_logs", "teacher_labels", "curated_examples", "test_sets", "train_sets"):
        assert f"| {stage} |" in out
    assert "dagster dev" in out

    # The defaults: a local store and a DAGSTER_HOME in the working directory.
    store = tmp_path / ".distill_store"
    days = recent_days(2)
    for day in days:
        assert (store / f"logs/dt={day}").is_dir()
    rows = duckdb.execute(f"SELECT count(*) FROM '{store}/tables/train_sets/size=100pct/train.parquet'").fetchone()[0]
    assert rows > 1000

    # The runs are in the instance that `dagster dev` will open.
    home = tmp_path / ".dagster_home"
    assert (home / "dagster.yaml").is_file()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 12
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        assert instance.get_latest_materialization_event(dg.AssetKey("curated_examples")) is not None
