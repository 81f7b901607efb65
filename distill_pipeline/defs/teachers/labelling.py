"""The teacher side of ``teacher_labels``: asking the configured teachers, and what the UI shows of it."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from distill_pipeline.batch import BatchLabeller
from distill_pipeline.defs.teachers.resources import TeacherResource
from distill_pipeline.labels import inputs_for_teachers
from distill_pipeline.relabel import Verdicts, ask_teachers
from distill_pipeline.reporting import markdown_table, parquet_sample_markdown
from distill_pipeline.store import ObjectStore
from distill_pipeline.task import Task
from distill_pipeline.teacher import RunTotals


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
    context.log.info(f"{len(inputs):,} distinct inputs for {len(specs)} teacher(s): {[s.name for s in specs]}")
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
        verdicts = ask_teachers(client, specs, task, inputs, labeller=labeller)
    context.log.info(totals_line(verdicts.totals))
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
