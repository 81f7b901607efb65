"""teacher_labels: each logged call's label, parsed from its response or asked of the configured teachers."""

import dataclasses
from pathlib import Path

import dagster as dg

from distill_pipeline.core.layout import teacher_labels_prefix
from distill_pipeline.core.published import RawLogs
from distill_pipeline.core.reporting import counts_table, markdown_table, parquet_sample_markdown
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.tables import publish_table
from distill_pipeline.core.task import Task
from distill_pipeline.data.labels import inputs_for_teachers, label_records
from distill_pipeline.data.pii import scrub_parquet
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.partitions import log_days
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.core.upstream import upstream
from distill_pipeline.defs.data.ingest import raw_logs
from distill_pipeline.defs.teachers.resources import TeacherResource
from distill_pipeline.teachers.batch import BatchLabeller
from distill_pipeline.teachers.client import RunTotals
from distill_pipeline.teachers.relabel import Verdicts, ask_teachers

PARSE_FAILURE_RATE_CHECK = "parse_failure_rate"
TEACHER_FAILURE_RATE_CHECK = "teacher_failure_rate"
LABELLED_ROWS_CHECK = "labelled_rows"


@dg.asset(
    deps=[raw_logs],
    partitions_def=log_days,
    group_name="teachers",
    kinds={"duckdb", "parquet"},
    check_specs=[
        dg.AssetCheckSpec(
            PARSE_FAILURE_RATE_CHECK,
            asset="teacher_labels",
            blocking=True,
            description="Share of teacher responses that could not be parsed is within the task's limit.",
        ),
        dg.AssetCheckSpec(
            TEACHER_FAILURE_RATE_CHECK,
            asset="teacher_labels",
            blocking=True,
            description="Share of the rows handed to teachers that no teacher answered is within the task's limit.",
        ),
        dg.AssetCheckSpec(
            LABELLED_ROWS_CHECK,
            asset="teacher_labels",
            blocking=True,
            description="A day with rows the teacher answered has at least one labelled row.",
        ),
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
        records = upstream(context, object_store, RawLogs).records(day, scratch)
        pii_scrubbed = scrub_records(context, object_store, loaded, day, records, scratch)
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
        f"{stats.labelled:,} labelled; parse rate {stats.parse_rate:.2%}; {stats.quarantined:,} quarantined; "
        f"teachers failed on {stats.teacher_failures:,} of {stats.to_teachers:,} rows"
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
            "pii_scrubbed": dg.MetadataValue.json(pii_scrubbed),
            "teacher_failure_rate": float(stats.teacher_failure_rate),
            "student_served_unlabelled": stats.student_served,
            "student_served_filled": stats.student_served_filled,
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
            ),
            # The parse rate counts answered calls only: without this, a day on which every call
            # failed would pass with "0 of 0 responses unparseable".
            dg.AssetCheckResult(
                check_name=TEACHER_FAILURE_RATE_CHECK,
                passed=stats.teacher_failure_rate <= loaded.checks.max_teacher_failure_rate,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "teacher_failure_rate": float(stats.teacher_failure_rate),
                    "limit": float(loaded.checks.max_teacher_failure_rate),
                },
                description=f"teachers answered no call for {stats.teacher_failures:,} of {stats.to_teachers:,} rows",
            ),
            # A day the student served alone has no teacher answer to label: nothing is wrong.
            dg.AssetCheckResult(
                check_name=LABELLED_ROWS_CHECK,
                passed=stats.labelled > 0 or stats.rows_in == stats.student_served,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "labelled": stats.labelled,
                    "rows_in": stats.rows_in,
                    "student_served_unlabelled": stats.student_served,
                },
                description=f"{stats.labelled:,} of {stats.rows_in:,} rows labelled; "
                f"{stats.student_served:,} student-served with no teacher answer",
            ),
        ],
    )


def scrub_records(
    context: dg.AssetExecutionContext, store: ObjectStore, task: Task, day: str, records: Path, scratch: Path
) -> dict[str, int]:
    """Scrub the day's records of PII in place, before teachers or the labels see them, when the task
    asks for it and raw_logs has not done it (a day ingested before scrubbing was switched on)."""
    if not task.curation.scrub_pii or (upstream(context, store, RawLogs).manifest(day) or {}).get("scrub_pii"):
        return {}
    return scrub_parquet(records, ("input", "response"), scratch / "duckdb-pii")


def teacher_verdicts(
    context: dg.AssetExecutionContext,
    store: ObjectStore,
    teacher: TeacherResource,
    task: Task,
    records: Path,
    scratch: Path,
) -> Verdicts:
    """Every input the mode hands to teachers, answered (from the ledger where it can) and voted."""
    specs = teacher.specs()
    if not specs:
        raise dg.Failure(
            f"teacher mode {teacher.mode!r} needs at least one teacher: set the teacher resource's models "
            "(or DISTILL_TEACHERS, e.g. openai/gpt-4o)"
        )
    inputs = inputs_for_teachers(records, task, scratch / "duckdb-inputs", teacher.mode)
    context.log.info(
        f"{len(inputs):,} distinct inputs ({len(inputs.student_served):,} only student-served, asked last and within "
        f"the budget) for {len(specs)} teacher(s): {[s.name for s in specs]}"
    )
    with teacher.client(store, context) as client:
        labeller = None
        if teacher.batch:
            labeller = BatchLabeller(
                client,
                store,
                poll_every_s=teacher.batch_poll_s,
                timeout_s=teacher.batch_timeout_s,
                discount=teacher.batch_discount,
            ).label
        verdicts = ask_teachers(client, specs, task, inputs.required, labeller=labeller, optional=inputs.student_served)
    context.log.info(totals_line(verdicts.totals))
    if verdicts.unasked:
        context.log.warning(
            f"the teacher budget ran out: {verdicts.unasked:,} student-served inputs stay unlabelled "
            "(a run with a larger budget resumes from the ledger)"
        )
    return verdicts


def totals_line(totals: RunTotals) -> str:
    return (
        f"teacher calls: {totals.paid_calls:,} paid, {totals.cache_hits:,} from the ledger, {totals.retries:,} retries "
        f"({totals.rate_limited:,} rate-limited), {totals.failed:,} failed; "
        f"{totals.prompt_tokens + totals.completion_tokens:,} tokens, ${totals.cost_usd:.4f}"
    )


def totals_metadata(totals: RunTotals) -> dict[str, object]:
    """A run's calls, tokens and dollars, as floats and ints the UI charts over materialisations."""
    return {
        "teacher_calls": totals.paid_calls,
        "teacher_cache_hits": totals.cache_hits,
        "teacher_requests": totals.calls,
        "teacher_retries": totals.retries,
        "teacher_rate_limited": totals.rate_limited,
        "teacher_failed": totals.failed,
        "teacher_prompt_tokens": totals.prompt_tokens,
        "teacher_completion_tokens": totals.completion_tokens,
        "teacher_cost_usd": float(totals.cost_usd),
        "teacher_unpriced_calls": totals.unpriced_calls,
    }


def verdicts_metadata(verdicts: Verdicts, review: Path) -> dict[str, object]:
    rows = [
        {
            "teacher": s.teacher,
            "answered": f"{s.answered:,} / {s.inputs:,}",
            "parse rate": f"{s.parse_rate:.1%}",
            "agrees with majority": f"{(s.agrees_with_majority / s.labelled if s.labelled else 0):.1%}",
            "paid calls": f"{s.calls:,}",
            "from ledger": f"{s.cache_hits:,}",
            "cost": f"${s.cost_usd:.4f}",
        }
        for s in verdicts.teachers
    ]
    columns = ["teacher", "answered", "parse rate", "agrees with majority", "paid calls", "from ledger", "cost"]
    review_rows = sum(1 for a in verdicts.table.column("t_agreement").to_pylist() if a is not None and a < 1.0)
    return {
        **totals_metadata(verdicts.totals),
        "teachers": dg.MetadataValue.md(markdown_table(rows, columns)),
        "inputs_to_review": review_rows,
        "review_sample": dg.MetadataValue.md(
            parquet_sample_markdown(review, ["request_id", "majority_label", "teacher_agreement", "input"], limit=10)
        ),
    }
