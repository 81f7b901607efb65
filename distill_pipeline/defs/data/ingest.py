"""A day's log objects in the store, validated into a typed table with every bad line quarantined.

``raw_logs`` is a graph of steps: the day's objects are cut into shards (contiguous runs in key
order, about equal bytes), each shard is ingested by a step of its own (a process under the
multiprocess executor, a pod under ``k8s_job_executor``), and one step merges them with request
ids deduplicated across shards exactly. A shard's tables travel through the store, under a
staging prefix of the run that the merge removes, so the steps share no disk.
"""

import dataclasses
import os
from typing import Any

import dagster as dg

from distill_pipeline.core.layout import MANIFEST, raw_logs_prefix, raw_logs_shard_prefix
from distill_pipeline.core.reporting import (
    counts_table,
    markdown_table,
    parquet_length_histogram,
    parquet_sample_markdown,
)
from distill_pipeline.core.tables import fetch_table, publish_table
from distill_pipeline.data.ingest import IngestStats
from distill_pipeline.data.sharding import ShardOutput, ingest_shard, merge_shards, plan_shards
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.partitions import log_days
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.logs.assets import teacher_logs
from distill_pipeline.logs.schema import LOG_SUFFIXES, log_object_prefix

QUARANTINE_RATE_CHECK = "quarantine_rate"
QUARANTINE_RATE_SPEC = dg.AssetCheckSpec(
    QUARANTINE_RATE_CHECK,
    asset="raw_logs",
    blocking=True,
    description="Share of invalid log lines (duplicates aside) is within the task's limit.",
)
TABLES = ("records.parquet", "quarantine.parquet")


class RawLogsConfig(dg.Config):
    shards: int = int(os.environ.get("DISTILL_INGEST_SHARDS", "1"))
    """Shards the day's objects are cut into (contiguous in key order, about equal bytes), each
    ingested by a step of its own, then merged with request ids deduplicated across them exactly."""


@dg.op(ins={"teacher_logs": dg.In(dg.Nothing)}, out=dg.DynamicOut(dict))
def plan_raw_log_shards(context: dg.OpExecutionContext, config: RawLogsConfig, store: StoreResource):
    """The day's log objects cut into shards, one dynamic output each (an empty day: one, empty)."""
    if config.shards < 1:
        raise dg.Failure(f"shards must be at least 1, not {config.shards}")
    day = context.partition_key
    object_store = store.open()
    listed = object_store.list(log_object_prefix(day))
    objects = [(info.key, info.size) for info in listed if info.key.endswith(LOG_SUFFIXES)]
    ignored = [info.key for info in listed if not info.key.endswith(LOG_SUFFIXES)]
    if ignored:
        context.log.warning(f"{len(ignored)} objects under {log_object_prefix(day)} are not log objects: {ignored[:5]}")
    if not objects:
        context.log.warning(
            f"no log objects under {log_object_prefix(day)} in {object_store.url}: publishing an empty day"
        )
    planned = plan_shards(objects, config.shards) or [[]]
    context.log.info(f"{len(objects)} objects of {day} in {len(planned)} shards")
    for index, keys in enumerate(planned):
        yield dg.DynamicOutput({"day": day, "shard": index, "keys": keys}, mapping_key=f"shard_{index:03d}")


@dg.op
def ingest_raw_log_shard(
    context: dg.OpExecutionContext, store: StoreResource, task: TaskResource, shard: dict[str, Any]
) -> dict[str, Any]:
    """One shard's objects validated into its records and quarantine tables, staged in the store."""
    object_store = store.open()
    loaded = task.load()
    with scratch_dir(context) as scratch:
        output = ingest_shard(
            object_store,
            shard["keys"],
            scratch,
            max_object_bytes=loaded.checks.max_log_object_bytes,
            scrub_pii=loaded.curation.scrub_pii,
        )
        prefix = raw_logs_shard_prefix(shard["day"], context.run.run_id, shard["shard"])
        stats = dataclasses.asdict(output.stats)
        publish_table(
            object_store,
            prefix,
            {"records.parquet": output.records, "quarantine.parquet": output.quarantine},
            {"stats": stats, "objects": shard["keys"]},
        )
    context.log.info(
        f"shard {shard['shard']}: {output.stats.lines_in:,} lines from {output.stats.objects} objects, "
        f"{output.stats.kept:,} kept, {output.stats.quarantined:,} quarantined"
    )
    return {**shard, "prefix": prefix, "stats": stats}


@dg.op(out={"result": dg.Out(dg.Nothing), QUARANTINE_RATE_SPEC.get_python_identifier(): dg.Out(dg.Nothing)})
def merge_raw_log_shards(
    context: dg.OpExecutionContext, store: StoreResource, task: TaskResource, shards: list[dict[str, Any]]
):
    """The shards merged into the day's records and quarantine tables, published, with the check."""
    shards = sorted(shards, key=lambda shard: shard["shard"])
    day = shards[0]["day"]
    object_store = store.open()
    loaded = task.load()
    limits = loaded.checks
    keys = [key for shard in shards for key in shard["keys"]]
    with scratch_dir(context) as scratch:
        outputs = [
            ShardOutput(
                *(fetch_table(object_store, shard["prefix"], name, scratch / "shards") for name in TABLES),
                IngestStats(**shard["stats"]),
            )
            for shard in shards
        ]
        records, quarantine = scratch / "records.parquet", scratch / "quarantine.parquet"
        stats = merge_shards(outputs, scratch / "merge", records, quarantine)
        context.log.info(
            f"{stats.lines_in:,} lines from {stats.objects} objects: {stats.kept:,} kept, {stats.quarantined:,} quarantined"
        )
        prefix = raw_logs_prefix(day)
        publish_table(
            object_store,
            prefix,
            {"records.parquet": records, "quarantine.parquet": quarantine},
            # Read by teacher_labels, which scrubs a day's records itself when they were not scrubbed here.
            {"day": day, "stats": dataclasses.asdict(stats), "objects": keys, "scrub_pii": loaded.curation.scrub_pii},
        )
        quarantine_sample = parquet_sample_markdown(
            quarantine, ["source_key", "source_line", "reason", "excerpt"], limit=10
        )
        histogram = parquet_length_histogram(records, "input", title=f"Input length, {day}") if stats.kept else ""
    for shard in shards:
        for name in (*TABLES, MANIFEST):
            object_store.delete(shard["prefix"] + name)
    invalid_rate = stats.invalid / stats.lines_in if stats.lines_in else 0.0
    yield dg.Output(
        None,
        "result",
        metadata={
            "dagster/row_count": stats.kept,
            "lines_in": stats.lines_in,
            "objects": stats.objects,
            "bytes_in": stats.bytes_in,
            "kept": stats.kept,
            "quarantined": stats.quarantined,
            "duplicate_request_ids": stats.duplicates,
            "pii_scrubbed": dg.MetadataValue.json(stats.pii_scrubbed),
            "invalid_rate": float(invalid_rate),
            "quarantine_reasons": dg.MetadataValue.md(counts_table(stats.reasons, "reason", stats.lines_in)),
            "quarantine_sample": dg.MetadataValue.md(quarantine_sample),
            "input_length_histogram": dg.MetadataValue.md(histogram or "_no rows_"),
            "table": location(object_store, prefix + "records.parquet"),
            "quarantine_table": location(object_store, prefix + "quarantine.parquet"),
            "shards": dg.MetadataValue.md(_shards_table(shards)),
        },
    )
    yield dg.AssetCheckResult(
        asset_key="raw_logs",
        check_name=QUARANTINE_RATE_CHECK,
        passed=invalid_rate <= limits.max_quarantine_rate,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"invalid_rate": float(invalid_rate), "limit": float(limits.max_quarantine_rate)},
        description=f"{stats.invalid:,} of {stats.lines_in:,} lines invalid",
    )


def _shards_table(shards: list[dict[str, Any]]) -> str:
    rows = [
        [
            str(shard["shard"]),
            f"{shard['stats']['objects']:,}",
            f"{shard['stats']['lines_in']:,}",
            f"{shard['stats']['kept']:,}",
        ]
        for shard in shards
    ]
    return markdown_table(rows, ["shard", "objects", "lines", "kept in the shard"])


@dg.graph_asset(
    ins={"teacher_logs": dg.AssetIn(key=teacher_logs.key, dagster_type=dg.Nothing)},
    partitions_def=log_days,
    group_name="data",
    kinds={"duckdb", "parquet"},
    check_specs=[QUARANTINE_RATE_SPEC],
)
def raw_logs(teacher_logs):
    """A day's log lines validated into a typed table; every bad line quarantined with its reason."""
    shards = plan_raw_log_shards(teacher_logs).map(ingest_raw_log_shard).collect()
    result, quarantine_rate = merge_raw_log_shards(shards)
    return {"result": result, QUARANTINE_RATE_SPEC.get_python_identifier(): quarantine_rate}
