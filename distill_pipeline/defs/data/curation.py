"""All labelled days curated into one clean example pool."""

import dataclasses

import dagster as dg

from distill_pipeline.core.layout import CURATED_PREFIX
from distill_pipeline.core.published import TeacherLabels
from distill_pipeline.core.reporting import (
    counts_table,
    markdown_table,
    parquet_length_histogram,
    parquet_sample_markdown,
)
from distill_pipeline.core.tables import publish_table
from distill_pipeline.data.curation import curate
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.core.upstream import fan_in_keys, upstream
from distill_pipeline.defs.data.conditions import AFTER_ANY_UPSTREAM_UPDATE
from distill_pipeline.defs.teachers.labelling import teacher_labels

MIN_ROWS_CHECK = "min_rows"
LABEL_BALANCE_CHECK = "label_balance"
REMOVED_SAMPLE_PER_RULE = 3


@dg.asset(
    deps=[dg.AssetDep(teacher_labels, partition_mapping=dg.AllPartitionMapping())],
    group_name="data",
    kinds={"duckdb", "parquet"},
    automation_condition=AFTER_ANY_UPSTREAM_UPDATE,
    check_specs=[
        dg.AssetCheckSpec(
            MIN_ROWS_CHECK, asset="curated_examples", blocking=True, description="Enough examples survive curation."
        ),
        dg.AssetCheckSpec(
            LABEL_BALANCE_CHECK,
            asset="curated_examples",
            blocking=True,
            description="The positive label's share is within the task's bounds.",
        ),
    ],
)
def curated_examples(
    context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource
) -> dg.MaterializeResult:
    """Every labelled day filtered, de-duplicated and de-biased into one example pool."""
    object_store = store.open()
    loaded = task.load()
    labels = upstream(context, object_store, TeacherLabels)
    days = labels.published_days(fan_in_keys(context, TeacherLabels))
    if not days:
        raise dg.Failure(
            f"no teacher_labels partitions in {object_store.url}: materialise raw_logs and teacher_labels first"
        )
    context.log.info(f"curating {len(days)} days of labels: {days[0]} .. {days[-1]}")
    with scratch_dir(context) as scratch:
        label_paths = [labels.labels(day, scratch) for day in days]
        curated, removed = scratch / "curated.parquet", scratch / "removed.parquet"
        stats = curate(label_paths, loaded.curation, scratch / "duckdb", curated, removed, seed=loaded.splits.seed)
        publish_table(
            object_store,
            CURATED_PREFIX,
            {"examples.parquet": curated, "removed.parquet": removed},
            {"days": days, "stats": dataclasses.asdict(stats), "curation": dataclasses.asdict(loaded.curation)},
        )
        removed_samples = "\n\n".join(
            f"**{rule}** ({count:,})\n\n"
            + parquet_sample_markdown(
                removed,
                ["request_id", "user_id", "detail", "input_excerpt"],
                limit=REMOVED_SAMPLE_PER_RULE,
                where=f"rule = '{rule}'",
            )
            for rule, count in stats.removed_by_rule.items()
            if count
        )
        sample = parquet_sample_markdown(curated, ["request_id", "user_id", "label", "input"], limit=10)
        histogram = parquet_length_histogram(curated, "input", title="Curated input length") if stats.kept else ""
    positives = stats.label_counts.get(loaded.label.positive, 0) if loaded.label.positive is not None else None
    positive_rate = positives / stats.kept if positives is not None and stats.kept else None
    checks = loaded.checks
    removal_rows = [
        (rule, f"{count:,}", f"{count / max(stats.rows_in, 1):.2%}") for rule, count in stats.removed_by_rule.items()
    ]
    balance_ok = positive_rate is None or checks.min_positive_rate <= positive_rate <= checks.max_positive_rate
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": stats.kept,
            "rows_in": stats.rows_in,
            "kept": stats.kept,
            "days": len(days),
            **{f"removed_by_{rule.replace(':', '_')}": count for rule, count in stats.removed_by_rule.items()},
            "removals_by_rule": dg.MetadataValue.md(
                markdown_table(
                    [*removal_rows, ("kept", f"{stats.kept:,}", f"{stats.kept / max(stats.rows_in, 1):.2%}")],
                    ["rule", "rows", "share of input"],
                )
            ),
            "removed_samples": dg.MetadataValue.md(removed_samples or "_nothing removed_"),
            "label_conflicts_in_duplicates": stats.label_conflicts,
            "pii_scrubbed": dg.MetadataValue.json(stats.pii_scrubbed),
            "users_capped": stats.users_capped,
            "label_distribution": dg.MetadataValue.md(counts_table(stats.label_counts, loaded.label.field)),
            **({"positive_rate": float(positive_rate)} if positive_rate is not None else {}),
            "sample": dg.MetadataValue.md(sample),
            "input_length_histogram": dg.MetadataValue.md(histogram or "_no rows_"),
            "table": location(object_store, CURATED_PREFIX + "examples.parquet"),
            "removed_table": location(object_store, CURATED_PREFIX + "removed.parquet"),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=MIN_ROWS_CHECK,
                passed=stats.kept >= checks.min_curated_rows,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"rows": stats.kept, "minimum": checks.min_curated_rows},
            ),
            dg.AssetCheckResult(
                check_name=LABEL_BALANCE_CHECK,
                passed=balance_ok,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "positive_rate": float(positive_rate) if positive_rate is not None else None,
                    "bounds": f"[{checks.min_positive_rate}, {checks.max_positive_rate}]",
                },
            ),
        ],
    )
