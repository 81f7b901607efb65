"""Choosing the teacher: a leaderboard of teacher × prompt × temperature on gold-labelled test rows."""

import json

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from distill_pipeline.core.layout import GOLD_LABELS, SYNTHETIC_PREFIX, TEACHER_EVAL_PREFIX
from distill_pipeline.core.published import CuratedExamples, TestSets
from distill_pipeline.core.reporting import counts_table, markdown_table
from distill_pipeline.core.store import ObjectNotFound
from distill_pipeline.core.tables import publish_table
from distill_pipeline.data.splitting import TEST_SETS
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.core.upstream import upstream
from distill_pipeline.defs.data.curation import curated_examples
from distill_pipeline.defs.data.splits import test_sets
from distill_pipeline.defs.teachers.labelling import totals_line, totals_metadata
from distill_pipeline.defs.teachers.resources import TeacherResource
from distill_pipeline.teachers.client import TeacherSpec
from distill_pipeline.teachers.evaluation import evaluate_teachers, grid, load_gold_sets
from distill_pipeline.teachers.synthetic import Seed, distinct_bigram_ratio, make_synthetic_examples


class TeacherEvalConfig(dg.Config):
    models: list[str] = Field(default_factory=list)
    """Teachers to compare (litellm model strings); empty: the teacher resource's models."""

    prompt_ids: list[str] = Field(default_factory=list)
    """Prompt templates to compare; empty: every prompt of the task."""

    temperatures: list[float] = Field(default_factory=lambda: [0.0])
    gold_table: str = GOLD_LABELS
    """Store key of the gold table: ``input`` and ``gold_label`` columns (Parquet, CSV or JSONL), and
    optionally ``test_set``; without it, the rows of the frozen test sets the table labels."""

    max_rows_per_set: int = 500
    """A seeded sample of each test set, at most this many rows: every configuration pays for each."""

    budget_usd: float | None = None
    """The most this evaluation may spend on new calls; None: the teacher resource's budget."""

    tolerance: float = 0.005
    """A cheaper configuration within this much mean accuracy of the best is recommended instead."""


@dg.asset(
    deps=[test_sets],
    group_name="teachers",
    kinds={"python", "json"},
)
def teacher_eval(
    context: dg.AssetExecutionContext,
    config: TeacherEvalConfig,
    store: StoreResource,
    task: TaskResource,
    teacher: TeacherResource,
) -> dg.MaterializeResult:
    """Teacher × prompt × temperature ranked on gold labels: accuracy per test set, parse failures, cost per 1,000."""
    object_store = store.open()
    loaded = task.load()
    models = config.models or teacher.models
    if not models:
        raise dg.Failure("no teachers to evaluate: set models in the run config or on the teacher resource")
    prompt_ids = config.prompt_ids or sorted(loaded.prompts)
    specs = grid(models, prompt_ids, config.temperatures, teacher.max_tokens)
    with scratch_dir(context) as scratch:
        gold_path = scratch / ("gold" + "".join(config.gold_table.rpartition(".")[1:]))
        try:
            object_store.get_file(config.gold_table, gold_path)
        except ObjectNotFound:
            raise dg.Failure(
                f"no gold table at {config.gold_table} in {object_store.url}: put a human-labelled table there "
                "with `distill-pipeline gold <file> --text-column ... --label-column ...`"
            ) from None
        test_set_tables = upstream(context, object_store, TestSets)
        pointer = test_set_tables.current()
        frozen = {}
        if pointer is not None:
            frozen = {name: test_set_tables.table(pointer, name, scratch) for name in TEST_SETS}
        sets = load_gold_sets(
            gold_path,
            frozen,
            loaded.label.values,
            max_rows_per_set=config.max_rows_per_set,
            seed=loaded.splits.seed,
            workdir=scratch / "duckdb",
        )
        context.log.info(
            f"{len(specs)} configurations on {', '.join(f'{s.name} ({len(s.inputs)} rows)' for s in sets)}"
        )
        with teacher.client(object_store, context, budget_usd=config.budget_usd) as client:
            board = evaluate_teachers(client, specs, loaded, sets, config.tolerance)
        context.log.info(totals_line(client.totals))
        report = {
            **board.to_json(),
            "test_sets": {s.name: len(s.inputs) for s in sets},
            "test_sets_version": pointer["version"] if pointer else None,
            "gold_table": config.gold_table,
            "totals": client.totals.as_dict(),
        }
        (scratch / "report.json").write_text(json.dumps(report, indent=2))
        (scratch / "report.md").write_text("# Teacher evaluation\n\n" + board.markdown())
        publish_table(
            object_store,
            TEACHER_EVAL_PREFIX,
            {"report.json": scratch / "report.json", "report.md": scratch / "report.md"},
            {"task": loaded.id, "configurations": len(specs)},
        )
    best = board.recommended
    return dg.MaterializeResult(
        metadata={
            "leaderboard": dg.MetadataValue.md(board.markdown()),
            "recommended": best.name if best else "none",
            "recommended_mean_accuracy": float(best.mean_accuracy) if best else 0.0,
            "configurations": len(specs),
            **{f"rows_{s.name}": len(s.inputs) for s in sets},
            **totals_metadata(client.totals),
            "report": location(object_store, TEACHER_EVAL_PREFIX + "report.md"),
        }
    )


class SyntheticExamplesConfig(dg.Config):
    seeds: int = 100
    """Curated examples to rewrite: a seeded sample, split evenly across the labels."""

    rewriter: str | None = None
    """The model that writes the rewrites; None: the teacher resource's first model."""

    labeller: str | None = None
    """The model that labels them (with the teacher resource's prompt); None: the first model."""

    budget_usd: float | None = None


SYNTHETIC_COLUMNS = (
    "request_id", "seed_request_id", "variation", "input", "label", "parse_method", "model",
    "prompt_template_id", "rewritten_by",
)  # fmt: skip


@dg.asset(
    deps=[curated_examples],
    group_name="teachers",
    kinds={"duckdb", "parquet"},
)
def synthetic_examples(
    context: dg.AssetExecutionContext,
    config: SyntheticExamplesConfig,
    store: StoreResource,
    task: TaskResource,
    teacher: TeacherResource,
) -> dg.MaterializeResult:
    """Teacher rewrites of curated seeds (Self-Instruct style), near duplicates dropped, labelled by the teacher."""
    object_store = store.open()
    loaded = task.load()
    first = teacher.models[0] if teacher.models else None
    rewriter_model, labeller_model = config.rewriter or first, config.labeller or first
    if rewriter_model is None or labeller_model is None:
        raise dg.Failure("no teacher to write and label synthetic examples: set the teacher resource's models")
    synthetic = loaded.synthetic
    rewriter = TeacherSpec(rewriter_model, "rewrite", synthetic.temperature, synthetic.max_tokens)
    labeller = TeacherSpec(labeller_model, teacher.prompt_id, teacher.temperature, teacher.max_tokens)
    with scratch_dir(context) as scratch:
        curated = upstream(context, object_store, CuratedExamples).examples(scratch)
        per_label = max(1, config.seeds // len(loaded.label.values))
        with duckdb.connect() as con:
            rows = con.execute(
                f"SELECT request_id, input FROM (SELECT *, row_number() OVER (PARTITION BY label "
                f"ORDER BY hash(request_id || '{loaded.splits.seed}')) AS n FROM read_parquet('{curated}')) "
                f"WHERE n <= {per_label} ORDER BY request_id"
            ).fetchall()
        seeds = [Seed(str(r[0]), str(r[1])) for r in rows]
        with teacher.client(object_store, context, budget_usd=config.budget_usd) as client:
            result = make_synthetic_examples(client, rewriter, labeller, loaded, seeds)
        context.log.info(totals_line(client.totals))
        kept = pa.Table.from_pylist(result.kept, schema=_synthetic_schema()).select(list(SYNTHETIC_COLUMNS))
        removed = pa.Table.from_pylist(
            result.removed,
            schema=pa.schema([(n, pa.string()) for n in ("seed_request_id", "variation", "input", "reason")]),
        )
        pq.write_table(kept, scratch / "examples.parquet")
        pq.write_table(removed, scratch / "removed.parquet")
        publish_table(
            object_store,
            SYNTHETIC_PREFIX,
            {"examples.parquet": scratch / "examples.parquet", "removed.parquet": scratch / "removed.parquet"},
            {"task": loaded.id, "seeds": len(seeds), "kept": kept.num_rows, "removed": result.removed_by_reason},
        )
    texts = [row["input"] for row in result.kept]
    labels: dict[str, int] = {}
    for row in result.kept:
        name = loaded.label.name_of(row["label"])
        labels[name] = labels.get(name, 0) + 1
    sample = [[r["variation"], r["label"], r["input"]] for r in result.kept[:10]]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(result.kept),
            "seeds": len(seeds),
            "candidates": len(result.kept) + len(result.removed),
            "kept": len(result.kept),
            "removed": len(result.removed),
            "distinct_bigram_ratio": float(distinct_bigram_ratio(texts)),
            "removal_reasons": dg.MetadataValue.md(
                counts_table(result.removed_by_reason, "reason") if result.removed else "_none_"
            ),
            "label_distribution": dg.MetadataValue.md(counts_table(labels, loaded.label.field) if labels else "_none_"),
            "sample": dg.MetadataValue.md(markdown_table(sample, ["variation", "label", "input"])),
            **totals_metadata(client.totals),
            "table": location(object_store, SYNTHETIC_PREFIX + "examples.parquet"),
        }
    )


def _synthetic_schema() -> pa.Schema:
    types = {"label": pa.int64()}
    return pa.schema([(name, types.get(name, pa.string())) for name in SYNTHETIC_COLUMNS])
