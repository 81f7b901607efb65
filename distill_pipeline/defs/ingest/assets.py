"""Log objects in the store, validated into a typed table per day, then labelled by the teacher."""

import dataclasses

import dagster as dg

from distill_pipeline.defs.common import location, scratch_dir
from distill_pipeline.defs.partitions import log_days
from distill_pipeline.defs.resources import StoreResource, TaskResource
from distill_pipeline.defs.teachers.labelling import teacher_verdicts, verdicts_metadata
from distill_pipeline.defs.teachers.resources import TeacherResource
from distill_pipeline.ingest import ingest_objects
from distill_pipeline.labels import label_records
from distill_pipeline.layout import raw_logs_prefix, teacher_labels_prefix
from distill_pipeline.logschema import LOG_SUFFIXES, SCHEMA_VERSION, log_object_prefix
from distill_pipeline.reporting import counts_table, parquet_length_histogram, parquet_sample_markdown
from distill_pipeline.tables import fetch_table, publish_table

QUARANTINE_RATE_CHECK = "quarantine_rate"
PARSE_FAILURE_RATE_CHECK = "parse_failure_rate"

teacher_logs = dg.AssetSpec(
    "teacher_logs",
    description="Teacher request/response log objects (JSONL, one per batch) that applications write to the store.",
    group_name="ingestion",
    kinds={"s3", "json"},
    partitions_def=log_days,
    metadata={"schema_version": SCHEMA_VERSION, "layout": "logs/dt=YYYY-MM-DD/<writer>-<batch>.jsonl[.gz]"},
)


@dg.asset(
    deps=[teacher_logs],
    partitions_def=log_days,
    group_name="ingestion",
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
def raw_logs(context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource) -> dg.MaterializeResult:
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
    limits = task.load().checks
    with scratch_dir(context) as scratch:
        records, quarantine = scratch / "records.parquet", scratch / "quarantine.parquet"
        stats = ingest_objects(object_store, keys, scratch / "duckdb", records, quarantine)
        context.log.info(
            f"{stats.lines_in:,} lines from {stats.objects} objects: {stats.kept:,} kept, {stats.quarantined:,} quarantined"
        )
        prefix = raw_logs_prefix(day)
        publish_table(
            object_store,
            prefix,
            {"records.parquet": records, "quarantine.parquet": quarantine},
            {"day": day, "stats": dataclasses.asdict(stats), "objects": keys},
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


@dg.asset(
    deps=[raw_logs],
    partitions_def=log_days,
    group_name="ingestion",
    kinds={"duckdb", "parquet"},
    check_specs=[
        dg.AssetCheckSpec(
            PARSE_FAILURE_RATE_CHECK,
            asset="teacher_labels",
            blocking=True,
            description="Share of teacher responses that could not be parsed is within the task's limit.",
        )
    ],
)
def teacher_labels(
    context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource, teacher: TeacherResource
) -> dg.MaterializeResult:
    """The task's label for each logged call: parsed from its response, or asked of the configured teachers."""
    day = context.partition_key
    object_store = store.open()
    loaded = task.load()
    teacher_metadata: dict[str, object] = {}
    with scratch_dir(context) as scratch:
        records = fetch_table(object_store, raw_logs_prefix(day), "records.parquet", scratch)
        labels, quarantine = scratch / "labels.parquet", scratch / "quarantine.parquet"
        files = {"labels.parquet": labels, "quarantine.parquet": quarantine}
        if teacher.mode == "logged":
            stats = label_records(records, loaded, scratch / "duckdb", labels, quarantine)
        else:
            review = scratch / "review.parquet"
            verdicts = teacher_verdicts(context, object_store, teacher, loaded, records, scratch)
            stats = label_records(
                records, loaded, scratch / "duckdb", labels, quarantine,
                mode=teacher.mode, verdicts=verdicts.table, review_path=review,
            )  # fmt: skip
            files["review.parquet"] = review
            teacher_metadata = verdicts_metadata(verdicts, review)
        prefix = teacher_labels_prefix(day)
        publish_table(
            object_store,
            prefix,
            files,
            {"day": day, "task": loaded.id, "mode": teacher.mode, "stats": dataclasses.asdict(stats)},
        )
        labelled_sample = parquet_sample_markdown(labels, ["request_id", "label", "parse_method", "input"], limit=10)
        quarantine_sample = parquet_sample_markdown(quarantine, ["request_id", "reason", "response_excerpt"], limit=10)
    label_names = {value: f"{value} ({loaded.label.name_of(value)})" for value in loaded.label.values}
    label_counts = {label_names.get(k, str(k)): v for k, v in stats.label_counts.items()}
    failure_rate = stats.parse_failures / stats.with_response if stats.with_response else 0.0
    context.log.info(
        f"{stats.labelled:,} labelled; parse rate {stats.parse_rate:.2%}; {stats.quarantined:,} quarantined"
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": stats.labelled,
            "rows_in": stats.rows_in,
            "labelled": stats.labelled,
            "quarantined": stats.quarantined,
            "parse_rate": float(stats.parse_rate),
            **{f"label_{name}": count for name, count in stats.label_counts.items()},
            "label_distribution": dg.MetadataValue.md(counts_table(label_counts, loaded.label.field)),
            "parse_methods": dg.MetadataValue.md(counts_table(stats.methods, "method")),
            "quarantine_reasons": dg.MetadataValue.md(counts_table(stats.reasons, "reason", stats.rows_in)),
            "labelled_sample": dg.MetadataValue.md(labelled_sample),
            "quarantine_sample": dg.MetadataValue.md(quarantine_sample),
            "table": location(object_store, prefix + "labels.parquet"),
            "mode": teacher.mode,
            **teacher_metadata,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=PARSE_FAILURE_RATE_CHECK,
                passed=failure_rate <= loaded.checks.max_parse_failure_rate,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "parse_failure_rate": float(failure_rate),
                    "limit": float(loaded.checks.max_parse_failure_rate),
                },
                description=f"{stats.parse_failures:,} of {stats.with_response:,} responses unparseable",
            )
        ],
    )
