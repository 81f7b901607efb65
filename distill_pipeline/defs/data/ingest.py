"""A day's log objects in the store, validated into a typed table with every bad line quarantined."""

import dataclasses
import functools
import os

import dagster as dg

from distill_pipeline.core.layout import raw_logs_prefix
from distill_pipeline.core.reporting import counts_table, parquet_length_histogram, parquet_sample_markdown
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.tables import publish_table
from distill_pipeline.data.ingest import ingest_objects
from distill_pipeline.data.sharding import ingest_in_shards
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.partitions import log_days
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.logs.assets import teacher_logs
from distill_pipeline.logs.schema import LOG_SUFFIXES, log_object_prefix

QUARANTINE_RATE_CHECK = "quarantine_rate"


class RawLogsConfig(dg.Config):
    shards: int = int(os.environ.get("DISTILL_INGEST_SHARDS", "1"))
    """Shards the day's objects are cut into (contiguous in key order, about equal bytes); each is
    ingested by a process of its own, then request ids are deduplicated across them exactly."""
    processes: int = 0
    """Shards ingested at once; 0: one per core."""


def _open_store(url: str | None, endpoint_url: str | None, region_name: str | None) -> ObjectStore:
    """The store as a shard's own process opens it (a resource is configured, not pickled)."""
    return StoreResource(url=url, endpoint_url=endpoint_url, region_name=region_name).open()


@dg.asset(
    deps=[teacher_logs],
    partitions_def=log_days,
    group_name="data",
    kinds={"duckdb", "parquet"},
    check_specs=[
        dg.AssetCheckSpec(
            QUARANTINE_RATE_CHECK,
            asset="raw_logs",
            blocking=True,
            description="Share of invalid log lines (duplicates aside) is within the task's limit.",
        )
    ],
)
def raw_logs(
    context: dg.AssetExecutionContext, config: RawLogsConfig, store: StoreResource, task: TaskResource
) -> dg.MaterializeResult:
    """A day's log lines validated into a typed table; every bad line quarantined with its reason."""
    day = context.partition_key
    object_store = store.open()
    listed = object_store.list(log_object_prefix(day))
    keys = [info.key for info in listed if info.key.endswith(LOG_SUFFIXES)]
    ignored = [info.key for info in listed if not info.key.endswith(LOG_SUFFIXES)]
    if ignored:
        context.log.warning(f"{len(ignored)} objects under {log_object_prefix(day)} are not log objects: {ignored[:5]}")
    if not keys:
        context.log.warning(
            f"no log objects under {log_object_prefix(day)} in {object_store.url}: publishing an empty day"
        )
    loaded = task.load()
    limits = loaded.checks
    with scratch_dir(context) as scratch:
        records, quarantine = scratch / "records.parquet", scratch / "quarantine.parquet"
        if config.shards > 1:
            stats, shard_stats = ingest_in_shards(
                functools.partial(_open_store, store.url, store.endpoint_url, store.region_name),
                [(info.key, info.size) for info in listed if info.key in set(keys)],
                config.shards,
                scratch / "shards",
                records,
                quarantine,
                max_object_bytes=limits.max_log_object_bytes,
                scrub_pii=loaded.curation.scrub_pii,
                processes=config.processes or None,
            )
            context.log.info(
                f"{len(shard_stats)} shards: "
                + ", ".join(f"{s.objects} objects, {s.lines_in:,} lines" for s in shard_stats)
            )
        else:
            stats = ingest_objects(
                object_store,
                keys,
                scratch / "duckdb",
                records,
                quarantine,
                max_object_bytes=limits.max_log_object_bytes,
                scrub_pii=loaded.curation.scrub_pii,
            )
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
    invalid_rate = stats.invalid / stats.lines_in if stats.lines_in else 0.0
    return dg.MaterializeResult(
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
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=QUARANTINE_RATE_CHECK,
                passed=invalid_rate <= limits.max_quarantine_rate,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"invalid_rate": float(invalid_rate), "limit": float(limits.max_quarantine_rate)},
                description=f"{stats.invalid:,} of {stats.lines_in:,} lines invalid",
            )
        ],
    )
