"""The label ledger as an asset: its segments compacted on a schedule, and what it holds, per teacher model."""

import dagster as dg

from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.defs.core.common import location
from distill_pipeline.defs.core.resources import StoreResource
from distill_pipeline.teachers.ledger import (
    DEFAULT_COMPACT_MIN_AGE_S,
    LEDGER_SEGMENTS,
    compact_ledger,
    load_entries,
    spend_by_model,
)

LABEL_LEDGER_JOB = "label_ledger_job"


class LabelLedgerConfig(dg.Config):
    min_age_s: float = DEFAULT_COMPACT_MIN_AGE_S
    """Only segments nothing has written for this long are merged (a running labelling job's are younger)."""


@dg.asset(group_name="teachers", kinds={"s3", "json"})
def label_ledger(
    context: dg.AssetExecutionContext, config: LabelLedgerConfig, store: StoreResource
) -> dg.MaterializeResult:
    """Every paid teacher answer: settled segments merged into one, with answers, tokens and spend per model."""
    object_store = store.open()
    result = compact_ledger(object_store, min_age_s=config.min_age_s)
    context.log.info(
        f"merged {result.merged} of {result.segments_before} segments ({result.duplicates_dropped} duplicate answers "
        f"dropped); {len(result.kept_changed)} rewritten meanwhile and kept"
    )
    spends = spend_by_model(load_entries(object_store).values())
    rows = [
        [
            s.model,
            f"{s.answers:,}",
            f"{s.prompt_tokens:,}",
            f"{s.completion_tokens:,}",
            f"${s.cost_usd:,.4f}",
            s.unpriced,
        ]
        for s in spends
    ]
    headers = ["model", "answers", "prompt tokens", "completion tokens", "cost", "unpriced answers"]
    return dg.MaterializeResult(
        metadata={
            "answers": sum(s.answers for s in spends),
            "cost_usd": float(sum(s.cost_usd for s in spends)),
            "segments_before": result.segments_before,
            "segments_after": result.segments_before - result.deleted + (1 if result.compacted_key else 0),
            "segments_merged": result.merged,
            "duplicates_dropped": result.duplicates_dropped,
            "kept_rewritten_meanwhile": len(result.kept_changed),
            "by_model": dg.MetadataValue.md(markdown_table(rows, headers) if rows else "_no answers yet_"),
            "segments": location(object_store, LEDGER_SEGMENTS),
        }
    )


label_ledger_job = dg.define_asset_job(
    LABEL_LEDGER_JOB,
    selection=dg.AssetSelection.assets(label_ledger),
    description="Compact the label ledger and report what it holds.",
)


@dg.schedule(
    name="label_ledger_schedule",
    cron_schedule="17 3 * * *",
    execution_timezone="UTC",
    job=label_ledger_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Compact the label ledger once a day, so opening it reads a few objects, not one per run.",
)
def label_ledger_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(run_key=f"label-ledger-{context.scheduled_execution_time.isoformat()}")
