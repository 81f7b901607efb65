"""The README's main command, end to end in a fresh directory, as a user runs it: the data stages, then the whole graph."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from distill_pipeline.core.layout import ABLATION_PREFIX, CHAMPION_CURRENT, EXPERIMENTS_PREFIX, eval_report_prefix
from distill_pipeline.logs.freshness import recent_days


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
    train = store / "tables/train_sets/size=100pct/train.parquet"
    ((rows,),) = duckdb.connect().sql(f"SELECT count(*) FROM '{train}'").fetchall()
    assert rows > 1000

    # The runs are in the instance that `dagster dev` will open.
    home = tmp_path / ".dagster_home"
    assert (home / "dagster.yaml").is_file()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        # Planned from the asset graph: raw_logs and teacher_labels share a run per day, curation and
        # the test sets one run, each size's training set one run.
        assert len(runs) == 2 + 1 + 6
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        assert instance.get_latest_materialization_event(dg.AssetKey("curated_examples")) is not None


def _tiny_task(folder: Path) -> Path:
    """The toxicity task with two training-set sizes, small test sets and a student that trains in seconds."""
    from distill_pipeline.core.task import BUILTIN_TASKS_DIR

    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    text = (folder / "task.toml").read_text()
    for old, new in (
        ("in_distribution_test_size = 500", "in_distribution_test_size = 120"),
        ("balanced_test_size = 200", "balanced_test_size = 60"),
        ('train_sizes = ["5%", "10%", "25%", "50%", "75%", "100%"]', 'train_sizes = ["25%", "100%"]'),
        ("max_length_cap = 128", "max_length_cap = 48"),
        ("eval_every_steps = 100", "eval_every_steps = 15"),
        ("checkpoint_every_steps = 100", "checkpoint_every_steps = 15"),
        ("min_train_steps = 60", "min_train_steps = 40"),
        # 120 in-distribution rows at the logs' ~12% toxic rate leave a good student and the
        # majority label a handful of discordant rows, at the edge of significance; the balanced
        # set tells them apart whatever the draw.
        ('decisive = ["in_distribution"]', 'decisive = ["balanced"]'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    (folder / "task.toml").write_text(text)
    return folder


@pytest.mark.slow
def test_demo_runs_the_whole_graph_to_a_promoted_champion(tmp_path: Path) -> None:
    """Simulated traffic through labels, curation, test and training sets, two students, their
    reports, the ablation and the promotion gate, as the README's main command runs them."""
    executable = shutil.which("distill-pipeline")
    assert executable, "the distill-pipeline command is not installed"
    task = _tiny_task(tmp_path / "task")
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "DISTILL_STORE", "DISTILL_TASK")}
    env["DISTILL_WORK_DIR"] = str(tmp_path / "work")
    completed = subprocess.run(
        [executable, "--task", str(task), "demo", "--days", "1", "--records-per-day", "1600"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = completed.stdout
    assert completed.returncode == 0, out + completed.stderr
    # 2 data days' worth of steps for one day, 2 sizes x (train set, adapter, report) of the base
    # variant alone (the task's [variants] demo), then the ablation, the experiments report and the champion.
    steps = 2 + 2 + 2 + 2 * 2 + 3
    # The last run holds the unpartitioned assets in the graph's order.
    assert f"[{steps - 1}/{steps}] champion" in out and f"[{steps}/{steps}] experiments_report" in out
    assert "promoted: champion is" in out
    sections = ("Accuracy by training-set size", "Teacher vs student vs baselines", "Against gold", "### Ablation")
    for section in sections:
        assert section in out
    # Progress stays readable: no progress bars or loader tables from the libraries.
    for noise in ("Loading weights", "LOAD REPORT", "Generating train split"):
        assert noise not in out + completed.stderr

    store = tmp_path / ".distill_store"
    champion = json.loads((store / CHAMPION_CURRENT).read_text())
    assert champion["decision"]["promote"] and champion["train_size"] in ("25pct", "100pct")
    manifest = json.loads((store / champion["adapter_prefix"] / "_manifest.json").read_text())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(manifest["files"])
    ablation = json.loads((store / ABLATION_PREFIX / "report.json").read_text())
    assert ablation["sizes"] == ["25pct", "100pct"] and set(ablation["variants"]) == {"base"}
    experiments = json.loads((store / EXPERIMENTS_PREFIX / "report.json").read_text())
    assert {(run["size"], run["variant"]) for run in experiments["runs"]} == {("25pct", "base"), ("100pct", "base")}
    for size in ("25pct", "100pct"):
        report = json.loads((store / eval_report_prefix(size) / "report.json").read_text())
        for test_set in ("in_distribution", "balanced"):
            scores = report["test_sets"][test_set]["vs_teacher"]
            assert scores["student"]["accuracy"] > scores["majority"]["accuracy"]
            # The simulator's truth is the gold table: the simulated teacher makes mistakes against it.
            entry = report["test_sets"][test_set]
            assert entry["gold_rows"] == entry["rows"]
            assert 0.5 < entry["vs_gold"]["teacher"]["accuracy"] < 1.0

    with dg.DagsterInstance.from_config(str(tmp_path / ".dagster_home")) as instance:
        runs = instance.get_runs()
        # One run per day, curation and test sets, per size the training set, per size and demo variant
        # (student, report), then ablation, experiments and champion.
        assert len(runs) == 7
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
