"""The Dagster assets, materialised for real against a local store and S3 on a moto server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from distill_pipeline.core.layout import CURATED_PREFIX, TEST_SETS_CURRENT, raw_logs_prefix, train_set_prefix
from distill_pipeline.core.store import LocalStore, ObjectStore, S3Store
from distill_pipeline.core.tables import read_manifest
from distill_pipeline.core.task import BUILTIN_TASKS_DIR, Task, load_task
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.data import splits as split_assets
from distill_pipeline.defs.data.curation import curated_examples
from distill_pipeline.defs.data.ingest import raw_logs
from distill_pipeline.defs.logs.assets import teacher_logs
from distill_pipeline.defs.teachers.labelling import teacher_labels
from distill_pipeline.defs.teachers.resources import TeacherResource
from distill_pipeline.demo.simulator import simulate_traffic
from distill_pipeline_tests.conftest import JIGSAW_TEACHER_RESPONSES, requires_shared_jigsaw
from distill_pipeline_tests.test_ingest import gzip_of_zeros

# Imported through the module: pytest would try to collect an asset named test_sets.
ASSETS = [teacher_logs, raw_logs, teacher_labels, curated_examples, split_assets.test_sets, split_assets.train_sets]
DAYS = ["2026-03-01", "2026-03-02"]


@pytest.fixture
def small_task(tmp_path: Path) -> Task:
    """The toxicity task with test sets small enough for a few thousand rows.

    Its training sizes stay among the default task's: the size partitions are read from the task
    when the code location loads.
    """
    folder = tmp_path / "task"
    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    text = (folder / "task.toml").read_text()
    text = text.replace("in_distribution_test_size = 500", "in_distribution_test_size = 120")
    text = text.replace("balanced_test_size = 200", "balanced_test_size = 60")
    text = text.replace(
        'train_sizes = ["5%", "10%", "25%", "50%", "75%", "100%"]', 'train_sizes = ["10%", "50%", "100%"]'
    )
    (folder / "task.toml").write_text(text)
    return load_task(folder)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def _resources(store: ObjectStore, task: Task) -> dict[str, object]:
    endpoint = store.client.meta.endpoint_url if isinstance(store, S3Store) else None
    return {
        "store": StoreResource(url=store.url, endpoint_url=endpoint),
        "task": TaskResource(name=str(task.source)),
        "teacher": TeacherResource(),
    }


def _materialize(
    asset: str, store: ObjectStore, task: Task, instance: dg.DagsterInstance, partition: str | None = None, **kwargs
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        ASSETS,
        selection=[asset],
        partition_key=partition,
        resources=_resources(store, task),
        instance=instance,
        **kwargs,
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, object]:
    (materialization,) = result.asset_materializations_for_node(asset)
    return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _ids(store: ObjectStore, key: str, tmp_path: Path) -> set[str]:
    local = tmp_path / key.replace("/", "_")
    store.get_file(key, local)
    return {row[0] for row in duckdb.connect().sql(f"SELECT request_id FROM '{local}'").fetchall()}


def _run_data_plane(store: ObjectStore, task: Task, instance: dg.DagsterInstance) -> dict[str, dict[str, object]]:
    seen: dict[str, dict[str, object]] = {}
    for day in DAYS:
        for asset in ("raw_logs", "teacher_labels"):
            result = _materialize(asset, store, task, instance, day)
            assert result.success
            assert all(_checks(result).values()), _checks(result)
            seen[f"{asset}/{day}"] = _metadata(result, asset)
    for asset in ("curated_examples", "test_sets"):
        result = _materialize(asset, store, task, instance)
        assert result.success
        seen[asset] = _metadata(result, asset)
    for size in task.splits.train_sizes:
        from distill_pipeline.data.splitting import TrainSize

        key = TrainSize.parse(size).key
        result = _materialize("train_sets", store, task, instance, key)
        assert result.success
        assert _checks(result) == {"no_test_leakage": True}
        seen[f"train_sets/{key}"] = _metadata(result, "train_sets")
    return seen


def test_every_data_stage_materialises_with_accounting(
    local_store: LocalStore, small_task: Task, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    simulated = simulate_traffic(local_store, days=DAYS, records_per_day=1500, seed=3, task=small_task)
    seen = _run_data_plane(local_store, small_task, instance)

    lines = sum(seen[f"raw_logs/{day}"]["lines_in"] for day in DAYS)
    assert lines == simulated.lines_written
    for day in DAYS:
        raw = seen[f"raw_logs/{day}"]
        assert raw["lines_in"] == raw["kept"] + raw["quarantined"]
        labels = seen[f"teacher_labels/{day}"]
        assert labels["rows_in"] == raw["kept"]
        assert labels["rows_in"] == labels["labelled"] + labels["quarantined"]
        assert 0.95 < labels["parse_rate"] <= 1.0
    curated = seen["curated_examples"]
    assert curated["rows_in"] == sum(seen[f"teacher_labels/{day}"]["labelled"] for day in DAYS)
    removed = sum(v for k, v in curated.items() if k.startswith("removed_by_"))
    assert curated["rows_in"] == curated["kept"] + removed
    assert "data:image/png;base64," in curated["input_length_histogram"]

    sets = seen["test_sets"]
    assert (sets["in_distribution_rows"], sets["balanced_rows"]) == (120, 60)
    assert sets["reused_frozen_version"] is False

    # Nested sizes: every smaller training set is a subset of every larger one.
    by_size = {
        key: _ids(local_store, train_set_prefix(key) + "train.parquet", tmp_path)
        for key in ("10pct", "50pct", "100pct")
    }
    assert by_size["10pct"] < by_size["50pct"] < by_size["100pct"]
    assert len(by_size["100pct"]) == seen["train_sets/100pct"]["pool_rows"]

    pointer = json.loads(local_store.get_bytes(TEST_SETS_CURRENT))
    test_ids = set()
    for name in ("in_distribution.parquet", "balanced.parquet"):
        test_ids |= _ids(local_store, pointer["prefix"] + name, tmp_path)
    assert not test_ids & by_size["100pct"]


def test_re_materialising_a_day_is_idempotent_and_replayed_objects_add_nothing(
    local_store: LocalStore, small_task: Task, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    simulate_traffic(local_store, days=DAYS[:1], records_per_day=800, seed=5, task=small_task)
    first = _metadata(_materialize("raw_logs", local_store, small_task, instance, DAYS[0]), "raw_logs")
    first_ids = _ids(local_store, raw_logs_prefix(DAYS[0]) + "records.parquet", tmp_path / "a")

    again = _metadata(_materialize("raw_logs", local_store, small_task, instance, DAYS[0]), "raw_logs")
    assert (again["kept"], again["quarantined"]) == (first["kept"], first["quarantined"])

    # The same log object delivered twice under another name (a retried upload) is all duplicates.
    (original,) = [o.key for o in local_store.list(f"logs/dt={DAYS[0]}/")]
    local_store.put_bytes(original.replace(".jsonl", "-replayed.jsonl"), local_store.get_bytes(original))
    replayed = _metadata(_materialize("raw_logs", local_store, small_task, instance, DAYS[0]), "raw_logs")
    assert replayed["kept"] == first["kept"]
    assert replayed["lines_in"] == 2 * first["lines_in"]
    assert replayed["duplicate_request_ids"] == first["kept"] + first["duplicate_request_ids"]
    assert _ids(local_store, raw_logs_prefix(DAYS[0]) + "records.parquet", tmp_path / "b") == first_ids


def test_test_sets_stay_frozen_until_rebuilt(
    local_store: LocalStore, small_task: Task, instance: dg.DagsterInstance
) -> None:
    simulate_traffic(local_store, days=DAYS, records_per_day=1500, seed=9, task=small_task)
    for day in DAYS[:1]:
        for asset in ("raw_logs", "teacher_labels"):
            assert _materialize(asset, local_store, small_task, instance, day).success
    assert _materialize("curated_examples", local_store, small_task, instance).success
    made = _metadata(_materialize("test_sets", local_store, small_task, instance), "test_sets")
    files_v1 = read_manifest(local_store, "test_sets/v0001/")["files"]

    # More traffic arrives and curation changes; the frozen sets must not.
    for asset in ("raw_logs", "teacher_labels"):
        assert _materialize(asset, local_store, small_task, instance, DAYS[1]).success
    assert _materialize("curated_examples", local_store, small_task, instance).success
    reused = _metadata(_materialize("test_sets", local_store, small_task, instance), "test_sets")
    assert (made["version"], reused["version"], reused["reused_frozen_version"]) == (1, 1, True)
    assert read_manifest(local_store, "test_sets/v0001/")["files"] == files_v1

    rebuilt = _materialize(
        "test_sets", local_store, small_task, instance, run_config={"ops": {"test_sets": {"config": {"rebuild": True}}}}
    )
    assert _metadata(rebuilt, "test_sets")["version"] == 2
    assert json.loads(local_store.get_bytes(TEST_SETS_CURRENT))["version"] == 2
    assert read_manifest(local_store, "test_sets/v0001/")["files"] == files_v1


def test_a_failed_blocking_check_stops_the_downstream_stage(
    local_store: LocalStore, small_task: Task, instance: dg.DagsterInstance
) -> None:
    good = simulate_traffic(local_store, days=DAYS[:1], records_per_day=200, seed=1, task=small_task)
    assert good.lines_written == 200
    local_store.put_bytes(f"logs/dt={DAYS[0]}/broken.jsonl", b"".join(b"{not json\n" for _ in range(100)))

    result = dg.materialize(
        ASSETS,
        selection=["raw_logs", "teacher_labels"],
        partition_key=DAYS[0],
        resources=_resources(local_store, small_task),
        instance=instance,
        raise_on_error=False,
    )
    assert _checks(result) == {"quarantine_rate": False}
    assert not result.asset_materializations_for_node("teacher_labels")
    assert read_manifest(local_store, f"tables/teacher_labels/dt={DAYS[0]}/") is None


def test_the_same_assets_run_on_s3(s3_store: S3Store, small_task: Task, instance: dg.DagsterInstance) -> None:
    simulate_traffic(s3_store, days=DAYS[:1], records_per_day=600, seed=2, task=small_task)
    for asset in ("raw_logs", "teacher_labels"):
        result = _materialize(asset, s3_store, small_task, instance, DAYS[0])
        assert result.success
    metadata = _metadata(result, "teacher_labels")
    assert metadata["table"].startswith(f"{s3_store.url}/tables/teacher_labels/dt={DAYS[0]}/")
    keys = {o.key for o in s3_store.list("tables/")}
    assert f"tables/teacher_labels/dt={DAYS[0]}/labels.parquet" in keys
    assert f"tables/raw_logs/dt={DAYS[0]}/_manifest.json" in keys


def _quarantined_objects(store: ObjectStore, day: str, tmp_path: Path) -> dict[str, str]:
    """The objects raw_logs quarantined whole (line 0) for ``day``, with their reasons."""
    local = tmp_path / f"quarantine-{day}.parquet"
    store.get_file(raw_logs_prefix(day) + "quarantine.parquet", local)
    query = f"SELECT source_key, reason FROM '{local}' WHERE source_line = 0"
    return dict(duckdb.connect().sql(query).fetchall())


def test_raw_logs_quarantines_hostile_s3_objects_and_ingests_the_rest(
    s3_store: S3Store, small_task: Task, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """A key the store refuses and a gzip bomb each cost one quarantined object, not the day."""
    cap = 2**20
    folder = small_task.source
    text = (folder / "task.toml").read_text()
    (folder / "task.toml").write_text(re.sub(r"(?m)^max_log_object_bytes = .*$", f"max_log_object_bytes = {cap}", text))
    task = load_task(folder)
    assert task.checks.max_log_object_bytes == cap
    simulated = simulate_traffic(s3_store, days=DAYS[:1], records_per_day=400, seed=4, task=task)
    escape = f"logs/dt={DAYS[0]}/../../escape.jsonl"
    s3_store.client.put_object(Bucket=s3_store.bucket, Key=f"{s3_store.prefix}/{escape}", Body=b"{}\n")
    bomb = f"logs/dt={DAYS[0]}/bomb.jsonl.gz"
    s3_store.put_bytes(bomb, gzip_of_zeros(16 * cap))

    result = _materialize("raw_logs", s3_store, task, instance, DAYS[0])

    assert result.success
    assert _checks(result) == {"quarantine_rate": True}
    metadata = _metadata(result, "raw_logs")
    assert metadata["lines_in"] == simulated.lines_written + 2
    assert metadata["objects"] == len(simulated.object_keys) + 2
    assert _quarantined_objects(s3_store, DAYS[0], tmp_path) == {
        escape: "object not read: invalid store key",
        bomb: f"object larger than {cap} bytes decompressed",
    }


def test_raw_logs_never_reads_or_writes_outside_a_local_store_through_symlinks(
    local_store: LocalStore, small_task: Task, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text("TOP SECRET, not JSON\n")
    simulate_traffic(local_store, days=DAYS[:1], records_per_day=200, seed=6, task=small_task)
    (local_store.root / f"logs/dt={DAYS[0]}/leak.jsonl").symlink_to(outside / "secret.jsonl")

    first = _materialize("raw_logs", local_store, small_task, instance, DAYS[0])
    assert first.success
    assert f"logs/dt={DAYS[0]}/leak.jsonl" not in read_manifest(local_store, raw_logs_prefix(DAYS[0]))["objects"]
    assert b"TOP SECRET" not in local_store.get_bytes(raw_logs_prefix(DAYS[0]) + "quarantine.parquet")

    # The tables folder made a symlink to a folder outside: the pipeline refuses to write there.
    shutil.rmtree(local_store.root / "tables")
    (outside / "tables").mkdir()
    (local_store.root / "tables").symlink_to(outside / "tables", target_is_directory=True)
    second = _materialize("raw_logs", local_store, small_task, instance, DAYS[0], raise_on_error=False)
    assert not second.success
    (failure,) = [e for e in second.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.to_string()
    assert "UnsafeKey: store key leads outside the store root through a symlink" in message
    assert list((outside / "tables").iterdir()) == []


def test_curation_without_labels_fails_with_a_clear_message(
    local_store: LocalStore, small_task: Task, instance: dg.DagsterInstance
) -> None:
    result = _materialize("curated_examples", local_store, small_task, instance, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "materialise raw_logs and teacher_labels first" in failure.step_failure_data.error.message
    assert read_manifest(local_store, CURATED_PREFIX) is None


def test_code_location_loads_without_heavy_imports() -> None:
    code = (
        "import sys\n"
        "from distill_pipeline.definitions import defs\n"
        "d = defs()\n"
        "print(sorted(k.to_user_string() for k in d.resolve_all_asset_keys()))\n"
        "heavy = ('torch', 'transformers', 'peft', 'litellm', 'evaluate', 'datasets', 'sklearn')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    data_plane = ["curated_examples", "raw_logs", "teacher_labels", "teacher_logs", "test_sets", "train_sets"]
    students = ["ablation_report", "champion", "eval_report", "experiments_report", "lora_adapter"]
    monitoring = ["ab_report", "drift_report", "user_feedback"]
    teachers = ["label_ledger", "synthetic_examples", "teacher_eval"]
    assert output[0] == str(sorted(data_plane + students + monitoring + teachers))
    assert output[1] == "[]"


@requires_shared_jigsaw
def test_real_teacher_answers_flow_through_import_ingest_and_labelling(
    local_store: LocalStore, instance: dg.DagsterInstance
) -> None:
    from distill_pipeline.logs.importer import import_table, jigsaw_mapping

    task = load_task()
    source = JIGSAW_TEACHER_RESPONSES
    summary = import_table(local_store, source, jigsaw_mapping(), default_day="2024-01-15", task=task)
    assert summary.rows_written == 8170
    raw = _metadata(_materialize("raw_logs", local_store, task, instance, "2024-01-15"), "raw_logs")
    assert (raw["lines_in"], raw["kept"], raw["quarantined"]) == (8170, 8170, 0)
    labels = _metadata(_materialize("teacher_labels", local_store, task, instance, "2024-01-15"), "teacher_labels")
    assert (labels["labelled"], labels["quarantined"], labels["parse_rate"]) == (8170, 0, 1.0)
    # The repository's own parse, where it exists, counts 1,799 toxic answers among 8,121 rows;
    # the 49 answers it never parsed add the rest.
    counts = "count(*) FILTER (WHERE parsed_is_bad = 1), count(*) FILTER (WHERE parsed_is_bad IS NULL)"
    (reference,) = duckdb.connect().sql(f"SELECT {counts} FROM '{source}'").fetchall()
    assert reference[0] == 1799
    assert 1799 <= labels["label_1"] <= 1799 + reference[1]
