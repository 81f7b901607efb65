"""A day ingested in shards, each apart, then merged, gives the rows one ingestion of the day gives."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.layout import raw_logs_prefix
from distill_pipeline.core.store import LocalStore, ObjectStore, open_store
from distill_pipeline.core.task import load_task
from distill_pipeline.data.ingest import ingest_objects
from distill_pipeline.data.sharding import ingest_shard, merge_shards, plan_shards
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.data.ingest import raw_logs
from distill_pipeline.defs.logs.assets import teacher_logs
from distill_pipeline.demo.simulator import TrafficProfile, simulate_traffic
from distill_pipeline.logs.schema import log_object_key, log_object_prefix

DAY = "2026-02-03"


@pytest.fixture(scope="module")
def day_store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """A small simulated day in 16 objects, with malformed lines, repeated ids within and across
    objects, and an object that replays lines of the first (ids first seen in another shard,
    one of them twice in the replay)."""
    store = LocalStore(tmp_path_factory.mktemp("shards") / "store")
    profile = TrafficProfile(records_per_object=250, malformed_rate=0.05)
    simulate_traffic(store, days=[DAY], records_per_day=4_000, seed=5, task=load_task(), profile=profile)
    first = sorted(info.key for info in store.list(log_object_prefix(DAY)))[0]
    lines = store.get_bytes(first).splitlines(keepends=True)
    store.put_bytes(log_object_key(DAY, "zz-replay"), b"".join([*lines[:40], lines[7]]))
    return store


def _same_rows(table: pa.Table, expected: pa.Table) -> bool:
    """The same columns, types and rows in the same order (a column may differ only in being
    declared not null)."""
    return table.num_rows == expected.num_rows and table.cast(expected.schema).equals(expected)


def _objects(store: ObjectStore) -> list[tuple[str, int]]:
    return [(info.key, info.size) for info in store.list(log_object_prefix(DAY))]


def test_shards_are_contiguous_balanced_runs_of_the_keys():
    objects = [(f"k{i:02d}", size) for i, size in enumerate([5, 1, 1, 1, 9, 1, 1, 1, 1, 3])]
    planned = plan_shards(objects, 4)
    assert [key for shard in planned for key in shard] == sorted(key for key, _ in objects)
    assert len(planned) == 4 and all(planned)
    assert plan_shards(objects[:2], 4) == [["k00"], ["k01"]]
    assert plan_shards([], 4) == []
    with pytest.raises(ValueError, match="at least 1"):
        plan_shards(objects, 0)


def test_four_shards_ingested_apart_give_the_rows_of_one(day_store: LocalStore, tmp_path: Path):
    keys = [key for key, _ in _objects(day_store)]
    one = ingest_objects(day_store, keys, tmp_path / "one", tmp_path / "one.parquet", tmp_path / "one_q.parquet")
    planned = plan_shards(_objects(day_store), 4)
    # Each shard on a store of its own opening, as a step in another process or pod does.
    outputs = [
        ingest_shard(open_store(day_store.url), shard, tmp_path / f"shard-{index}")
        for index, shard in enumerate(planned)
    ]
    merged = merge_shards(outputs, tmp_path / "merge", tmp_path / "merged.parquet", tmp_path / "merged_q.parquet")
    assert len(planned) == 4
    # The replayed object's ids were kept by the first shard: the last shard alone keeps them again.
    assert sum(o.stats.duplicates for o in outputs) < merged.duplicates
    for merged_table, one_table in (("merged.parquet", "one.parquet"), ("merged_q.parquet", "one_q.parquet")):
        assert _same_rows(pq.read_table(tmp_path / merged_table), pq.read_table(tmp_path / one_table))
    assert (merged.lines_in, merged.kept, merged.quarantined, merged.reasons) == (
        one.lines_in,
        one.kept,
        one.quarantined,
        one.reasons,
    )
    assert merged.kept + merged.quarantined == merged.lines_in


def test_raw_logs_ingests_each_shard_in_a_step_of_its_own_and_publishes_the_same_tables(
    day_store: LocalStore, tmp_path: Path
):
    resources = {"store": StoreResource(url=day_store.url), "task": TaskResource()}
    tables, metadata = {}, {}
    with dg.instance_for_test() as instance:
        for shards in (1, 4):
            result = dg.materialize(
                [teacher_logs, raw_logs],
                selection=["raw_logs"],
                partition_key=DAY,
                resources=resources,
                instance=instance,
                run_config={"ops": {"raw_logs": {"ops": {"plan_raw_log_shards": {"config": {"shards": shards}}}}}},
            )
            assert result.success
            steps = sorted(stats.step_key for stats in instance.get_run_step_stats(result.run_id))
            assert steps == sorted(
                [
                    "raw_logs.plan_raw_log_shards",
                    "raw_logs.merge_raw_log_shards",
                    *(f"raw_logs.ingest_raw_log_shard[shard_{index:03d}]" for index in range(shards)),
                ]
            )
            (evaluation,) = result.get_asset_check_evaluations()
            assert evaluation.check_name == "quarantine_rate" and evaluation.passed
            (materialization,) = result.asset_materializations_for_node("raw_logs")
            metadata[shards] = materialization.metadata
            tables[shards] = [
                pq.read_table(day_store.root / raw_logs_prefix(DAY) / name)
                for name in ("records.parquet", "quarantine.parquet")
            ]
            # The shards' staged tables are gone once merged.
            assert day_store.list("staging/") == []
    assert all(_same_rows(a, b) for a, b in zip(tables[4], tables[1], strict=True))
    assert metadata[4]["lines_in"] == metadata[1]["lines_in"]
    assert metadata[4]["duplicate_request_ids"] == metadata[1]["duplicate_request_ids"]
    assert "| 3 |" in metadata[4]["shards"].value
