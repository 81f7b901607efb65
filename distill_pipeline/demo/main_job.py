"""The main job: simulated traffic into the store, then every stage materialised headless.

Runs go through a real Dagster instance (``$DAGSTER_HOME``, by default ``./.dagster_home``), so
``dagster dev`` started afterwards with the same ``DAGSTER_HOME`` shows every run and its
metadata. Which assets run, in which order and for which partitions, comes from the asset graph
(:func:`plan_runs`); each run is executed in process by Dagster, with a line of progress per asset.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_DAGSTER_HOME = ".dagster_home"


def instance_template() -> Path:
    """The project's ``dagster.yaml``: packaged in a wheel, at the repository root when editable."""
    for candidate in (PACKAGE_DIR / "dagster.yaml", PACKAGE_DIR.parent / "dagster.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("dagster.yaml not found beside the package or at the repository root")


def prepare_dagster_home(path: str | None = None) -> Path:
    """Use ``$DAGSTER_HOME`` (or ``path``), creating it with the project's instance config."""
    home = Path(path or os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(instance_template(), home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@dataclass
class StepOutcome:
    asset: str
    partition: str | None
    seconds: float
    metadata: dict[str, Any]
    checks: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRun:
    """One Dagster run: assets of one partitions definition, materialised for one partition."""

    assets: tuple[str, ...]
    partition: str | None


#: The main job's targets: everything upstream of these is materialised, in the graph's order.
TARGETS = {"data": ("train_sets",), "all": ("ablation_report", "experiments_report", "champion")}


def _value(metadata: dict[str, Any], key: str) -> Any:
    entry = metadata.get(key)
    return getattr(entry, "value", entry)


def _fmt(metadata: dict[str, Any], key: str) -> str:
    value = _value(metadata, key)
    if isinstance(value, float):
        return f"{value:.2%}" if value <= 1 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


#: What one line of progress says about an asset's materialisation, from its metadata.
DESCRIBE: dict[str, Callable[[dict[str, Any]], str]] = {
    "raw_logs": lambda m: (
        f"{_fmt(m, 'lines_in')} lines -> {_fmt(m, 'kept')} kept, {_fmt(m, 'quarantined')} quarantined"
    ),
    "teacher_labels": lambda m: (
        f"{_fmt(m, 'labelled')} labelled, parse rate {_fmt(m, 'parse_rate')}, {_fmt(m, 'quarantined')} quarantined"
    ),
    "curated_examples": lambda m: f"{_fmt(m, 'rows_in')} in -> {_fmt(m, 'kept')} kept",
    "test_sets": lambda m: (
        f"v{_fmt(m, 'version')}{' (reused, frozen)' if _value(m, 'reused_frozen_version') else ''}: "
        f"{_fmt(m, 'in_distribution_rows')} in-distribution, {_fmt(m, 'balanced_rows')} balanced"
    ),
    "train_sets": lambda m: f"{_fmt(m, 'dagster/row_count')} rows of a {_fmt(m, 'pool_rows')}-row pool",
    "lora_adapter": lambda m: (
        f"{_fmt(m, 'train_rows')} rows, {_fmt(m, 'steps')} steps on {_fmt(m, 'device')}, "
        f"{_fmt(m, 'train_tokens_per_s')} tokens/s, validation accuracy {_fmt(m, 'val_accuracy')}"
        + (" (reused)" if _value(m, "reused_published_adapter") else "")
    ),
    "eval_report": lambda m: (
        f"student {_fmt(m, 'student_accuracy_in_distribution')} / {_fmt(m, 'student_accuracy_balanced')}, "
        f"tfidf_logreg {_fmt(m, 'tfidf_logreg_accuracy_in_distribution')} / "
        f"{_fmt(m, 'tfidf_logreg_accuracy_balanced')} (in-distribution / balanced)"
    ),
    "ablation_report": lambda m: f"{_fmt(m, 'sizes')} sizes fitted",
    "experiments_report": lambda m: (
        f"{_fmt(m, 'runs')} students compared, recommended {_fmt(m, 'recommended_size')}/{_fmt(m, 'recommended_variant')}"
    ),
    "champion": lambda m: f"{_fmt(m, 'decision')}: champion is {_fmt(m, 'champion_size')}",
}


def plan_runs(
    definitions: Any, targets: Sequence[str], days: Sequence[str], variants: Sequence[str] | None = None
) -> list[PlannedRun]:
    """The runs that materialise ``targets`` and everything upstream of them, from the asset graph.

    Assets come in the graph's topological order; consecutive assets with the same partitions
    definition share a run per partition (Dagster runs one partition of one definition at a
    time): day-partitioned assets for each of ``days``, the size-partitioned ones for each size,
    the students for each size and each of ``variants`` (by default the task's ``[variants] demo``;
    the other variants are launched from the UI).
    """
    import dagster as dg

    from distill_pipeline.defs.core.partitions import VARIANT
    from distill_pipeline.defs.core.resources import location_task

    chosen = set(variants if variants is not None else location_task().demo_variants)

    graph = definitions.resolve_asset_graph()
    selected = dg.AssetSelection.assets(*targets).upstream().resolve(graph)
    ordered = [key for key in graph.toposorted_asset_keys if key in selected and graph.get(key).is_materializable]
    runs: list[PlannedRun] = []
    group: list[Any] = []

    def flush() -> None:
        if not group:
            return
        partitions = graph.get(group[0]).partitions_def
        if partitions is None:
            keys: Sequence[str | None] = [None]
        elif isinstance(partitions, dg.TimeWindowPartitionsDefinition):
            keys = list(days)
        elif isinstance(partitions, dg.MultiPartitionsDefinition) and VARIANT in partitions.partition_dimension_names:
            keys = [
                key
                for key in partitions.get_partition_keys()
                if partitions.get_partition_key_from_str(key).keys_by_dimension[VARIANT] in chosen
            ]
        else:
            keys = partitions.get_partition_keys()
        names = tuple(key.to_user_string() for key in group)
        runs.extend(PlannedRun(names, key) for key in keys)
        group.clear()

    for key in ordered:
        if group and graph.get(key).partitions_def != graph.get(group[0]).partitions_def:
            flush()
        group.append(key)
    flush()
    return runs


class StageFailed(RuntimeError):
    pass


def run_plan(definitions: Any, runs: Sequence[PlannedRun], *, out: TextIO = sys.stdout) -> list[StepOutcome]:
    """Execute each planned run in process in the current ``$DAGSTER_HOME`` instance, a line of
    progress per materialised asset.

    The resources read ``DISTILL_STORE`` and ``DISTILL_TASK`` from the environment, as a run
    launched from the UI does.
    """
    import dagster as dg

    assets = list(definitions.assets or [])
    total = sum(len(run.assets) for run in runs)
    outcomes: list[StepOutcome] = []
    # Pipes' message reader is a Dagster preview API; its notice would interleave with the
    # progress lines of every training step.
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    with dg.DagsterInstance.get() as instance:
        for run in runs:
            label = "+".join(run.assets) + (f" {run.partition}" if run.partition else "")
            print(f"{label} ...", flush=True, file=out)
            result = dg.materialize(
                assets,
                selection=list(run.assets),
                partition_key=run.partition,
                instance=instance,
                resources=definitions.resources,
                raise_on_error=False,
                # Progress is one line per asset here; the full event log is in the UI.
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                tags={"distill/launched_by": "main_job"},
            )
            seconds = {
                stats.step_key: (stats.end_time or stats.start_time or 0.0) - (stats.start_time or 0.0)
                for stats in instance.get_run_step_stats(result.run_id)
            }
            checks = {
                (evaluation.asset_key.to_user_string(), evaluation.check_name): evaluation.passed
                for evaluation in result.get_asset_check_evaluations()
            }
            for asset in run.assets:
                materializations = result.asset_materializations_for_node(asset)
                if not materializations:
                    continue
                metadata = dict(materializations[-1].metadata)
                asset_checks = {name: passed for (owner, name), passed in checks.items() if owner == asset}
                # A graph-backed asset (raw_logs) runs as several steps named after it.
                spent = sum(t for step, t in seconds.items() if step == asset or step.startswith(f"{asset}."))
                outcome = StepOutcome(asset, run.partition, spent, metadata, asset_checks)
                outcomes.append(outcome)
                failed = [name for name, passed in asset_checks.items() if not passed]
                warning = f"  [checks failed: {', '.join(failed)}]" if failed else ""
                place = f"[{len(outcomes)}/{total}] {asset}" + (f" {run.partition}" if run.partition else "")
                print(f"{place} {DESCRIBE[asset](metadata)} ({outcome.seconds:.1f}s){warning}", file=out, flush=True)
            if not result.success:
                print(f"FAILED: {label} (run {result.run_id})", file=out)
                raise StageFailed(_failure_text(result, label))
    return outcomes


def _failure_text(result: Any, label: str) -> str:
    messages = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE" and event.step_failure_data.error:
            messages.append(event.step_failure_data.error.message.strip())
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if not evaluation.passed:
                messages.append(f"check {evaluation.check_name} failed: {evaluation.description or ''}")
    detail = "\n".join(messages) or "see the run in the Dagster UI"
    return f"{label} failed in run {result.run_id}:\n{detail}"


def summary_table(outcomes: Sequence[StepOutcome]) -> str:
    """Counts per stage, summed over partitions."""
    from distill_pipeline.core.reporting import markdown_table

    columns = {
        "raw_logs": ("lines_in", "kept", "quarantined"),
        "teacher_labels": ("rows_in", "labelled", "quarantined"),
        "curated_examples": ("rows_in", "kept", None),
        "test_sets": (None, "dagster/row_count", None),
        "train_sets": ("pool_rows", "dagster/row_count", None),
    }
    rows = []
    for asset, (in_key, out_key, dropped_key) in columns.items():
        picked = [o for o in outcomes if o.asset == asset]
        if not picked:
            continue

        def total(key: str | None, picked: list[StepOutcome] = picked, asset: str = asset) -> str:
            if key is None:
                return ""
            values = [v for v in (_value(o.metadata, key) for o in picked) if isinstance(v, int)]
            if asset == "train_sets":
                # Every size draws from the same pool: list the sizes rather than add them up.
                return " / ".join(f"{v:,}" for v in values) if key != "pool_rows" else f"{max(values):,}"
            return f"{sum(values):,}"

        removed = ""
        if asset == "curated_examples":
            removed = f"{_value(picked[-1].metadata, 'rows_in') - _value(picked[-1].metadata, 'kept'):,}"
        partitions = ", ".join(o.partition for o in picked if o.partition) or "-"
        rows.append(
            (
                asset,
                partitions,
                total(in_key),
                total(out_key),
                total(dropped_key) or removed,
                f"{sum(o.seconds for o in picked):.1f}",
            )
        )
    return markdown_table(rows, ["stage", "partitions", "rows in", "rows out", "quarantined / removed", "seconds"])


def results_tables(store: Any, size_keys: Sequence[str]) -> str:
    """The students' results from the store: per size, the champion beside teacher and baselines, the ablation."""
    from distill_pipeline.core.layout import ABLATION_PREFIX
    from distill_pipeline.core.published import Champion, EvalReports
    from distill_pipeline.core.reporting import markdown_table
    from distill_pipeline.core.tables import read_report
    from distill_pipeline.data.splitting import TEST_SETS
    from distill_pipeline.students.evaluation import comparison_report
    from distill_pipeline.students.reports import MAJORITY, STUDENT, TFIDF, reference_note, scores_by_test_set

    reports = [EvalReports(store).report(size) for size in size_keys]
    reports = sorted((r for r in reports if r is not None), key=lambda r: r["train_rows"])
    if not reports:
        return ""

    def pair(report: dict[str, Any], model: str) -> str:
        scores = scores_by_test_set(report, model)
        return " / ".join(f"{scores[name]['accuracy']:.3f}" for name in TEST_SETS)

    by_size = markdown_table(
        [(r["size"], f"{r['train_rows']:,}", pair(r, STUDENT), pair(r, TFIDF), pair(r, MAJORITY)) for r in reports],
        ["size", "training rows", "student", "tfidf_logreg", "majority"],
    )
    champion = Champion(store).current()
    shown = next((r for r in reports if champion and r["train_id"] == champion["train_id"]), reports[-1])
    title = "champion" if champion and shown["train_id"] == champion["train_id"] else "largest training set"
    ablation = read_report(store, ABLATION_PREFIX)
    parts = [
        "### Accuracy by training-set size (in-distribution / balanced)",
        by_size,
        f"### Teacher vs student vs baselines: the {title}, {shown['size']} ({shown['train_rows']:,} training rows)",
        reference_note(shown),
        comparison_report({name: entry["vs_teacher"] for name, entry in shown["test_sets"].items()}),
    ]
    gold = {name: entry["vs_gold"] for name, entry in shown["test_sets"].items() if entry.get("vs_gold")}
    if gold:
        parts += [f"### Against gold (human) labels: the {title}, {shown['size']}", comparison_report(gold)]
    if ablation is not None:
        gains = ", ".join(f"{name} {gain:+.2f} points" for name, gain in ablation["doubling_gain_points"].items())
        parts += ["### Ablation", ablation["recommendation"] + (f" Doubling gain: {gains}." if gains else "")]
    return "\n\n".join(parts)
