"""The main job: simulated traffic into the store, then every stage materialised headless.

Runs go through a real Dagster instance (``$DAGSTER_HOME``, by default ``./.dagster_home``), so
``dagster dev`` started afterwards with the same ``DAGSTER_HOME`` shows every run and its
metadata. Stages run in dependency order, one partition at a time, with a line of progress each.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import time
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


def recent_days(count: int, *, until: dt.date | None = None) -> list[str]:
    last = until or dt.datetime.now(dt.UTC).date()
    return [(last - dt.timedelta(days=offset)).isoformat() for offset in range(count - 1, -1, -1)]


@dataclass
class StepOutcome:
    asset: str
    partition: str | None
    seconds: float
    metadata: dict[str, Any]
    checks: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    asset: str
    partition: str | None
    # What one line of progress says about the result, from the materialisation's metadata.
    describe: Callable[[dict[str, Any]], str]
    # Blocking checks whose failure is a decision rather than a breakdown (a promotion gate that
    # stays closed): the step is reported and the job goes on.
    gate_checks: tuple[str, ...] = ()


def _value(metadata: dict[str, Any], key: str) -> Any:
    entry = metadata.get(key)
    return getattr(entry, "value", entry)


def _fmt(metadata: dict[str, Any], key: str) -> str:
    value = _value(metadata, key)
    if isinstance(value, float):
        return f"{value:.2%}" if value <= 1 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def plan_data_stages(days: Sequence[str], size_keys: Sequence[str]) -> list[Step]:
    steps: list[Step] = []
    for day in days:
        steps.append(
            Step(
                "raw_logs",
                day,
                lambda m: (
                    f"{_fmt(m, 'lines_in')} lines -> {_fmt(m, 'kept')} kept, {_fmt(m, 'quarantined')} quarantined"
                ),
            )
        )
        steps.append(
            Step(
                "teacher_labels",
                day,
                lambda m: (
                    f"{_fmt(m, 'labelled')} labelled, parse rate {_fmt(m, 'parse_rate')}, "
                    f"{_fmt(m, 'quarantined')} quarantined"
                ),
            )
        )
    steps.append(Step("curated_examples", None, lambda m: f"{_fmt(m, 'rows_in')} in -> {_fmt(m, 'kept')} kept"))
    steps.append(
        Step(
            "test_sets",
            None,
            lambda m: (
                f"v{_fmt(m, 'version')}{' (reused, frozen)' if _value(m, 'reused_frozen_version') else ''}: "
                f"{_fmt(m, 'in_distribution_rows')} in-distribution, {_fmt(m, 'balanced_rows')} balanced"
            ),
        )
    )
    for key in size_keys:
        steps.append(
            Step(
                "train_sets", key, lambda m: f"{_fmt(m, 'dagster/row_count')} rows of a {_fmt(m, 'pool_rows')}-row pool"
            )
        )
    return steps


def plan_student_stages(size_keys: Sequence[str]) -> list[Step]:
    """After the data stages: a student and its evaluation per size, then the ablation and the champion."""
    steps: list[Step] = []
    for key in size_keys:
        steps.append(
            Step(
                "lora_adapter",
                key,
                lambda m: (
                    f"{_fmt(m, 'train_rows')} rows, {_fmt(m, 'steps')} steps on {_fmt(m, 'device')}, "
                    f"{_fmt(m, 'train_tokens_per_s')} tokens/s, validation accuracy {_fmt(m, 'val_accuracy')}"
                    + (" (reused)" if _value(m, "reused_published_adapter") else "")
                ),
            )
        )
        steps.append(
            Step(
                "eval_report",
                key,
                lambda m: (
                    f"student {_fmt(m, 'student_accuracy_in_distribution')} / {_fmt(m, 'student_accuracy_balanced')}, "
                    f"tfidf_logreg {_fmt(m, 'tfidf_logreg_accuracy_in_distribution')} / "
                    f"{_fmt(m, 'tfidf_logreg_accuracy_balanced')} (in-distribution / balanced)"
                ),
            )
        )
    steps.append(Step("ablation_report", None, lambda m: f"{_fmt(m, 'sizes')} sizes fitted"))
    steps.append(
        Step(
            "champion",
            None,
            lambda m: f"{_fmt(m, 'decision')}: champion is {_fmt(m, 'champion_size')}",
            gate_checks=("promotion_gate",),
        )
    )
    return steps


class StageFailed(RuntimeError):
    pass


def run_steps(steps: Sequence[Step], *, out: TextIO = sys.stdout) -> list[StepOutcome]:
    """Materialise each step in order in the current ``$DAGSTER_HOME`` instance.

    The resources read ``DISTILL_STORE`` and ``DISTILL_TASK`` from the environment, as a run
    launched from the UI does.
    """
    import dagster as dg

    from distill_pipeline.definitions import defs as load_defs

    definitions = load_defs()
    assets = list(definitions.assets or [])
    outcomes = []
    # Pipes' message reader is a Dagster preview API; its notice would interleave with the
    # progress lines of every training step.
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    with dg.DagsterInstance.get() as instance:
        for index, step in enumerate(steps, start=1):
            label = f"[{index}/{len(steps)}] {step.asset}" + (f" {step.partition}" if step.partition else "")
            print(f"{label} ...", end="", flush=True, file=out)
            started = time.perf_counter()
            result = dg.materialize(
                assets,
                selection=[step.asset],
                partition_key=step.partition,
                instance=instance,
                resources=definitions.resources,
                raise_on_error=False,
                # Progress is one line per step here; the full event log is in the UI.
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                tags={"distill/launched_by": "main_job"},
            )
            seconds = time.perf_counter() - started
            materializations = result.asset_materializations_for_node(step.asset)
            metadata = dict(materializations[-1].metadata) if materializations else {}
            checks = {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}
            failed_gates = {name for name, passed in checks.items() if not passed} & set(step.gate_checks)
            closed_gate_only = bool(materializations) and failed_gates and _only_gates_failed(result, failed_gates)
            if not result.success and not closed_gate_only:
                print(f" FAILED after {seconds:.1f}s (run {result.run_id})", file=out)
                raise StageFailed(_failure_text(result, step))
            outcomes.append(StepOutcome(step.asset, step.partition, seconds, metadata, checks))
            failed_checks = [name for name, passed in checks.items() if not passed]
            warning = f"  [checks failed: {', '.join(failed_checks)}]" if failed_checks else ""
            print(f" {step.describe(metadata)} ({seconds:.1f}s){warning}", file=out, flush=True)
    return outcomes


def _only_gates_failed(result: Any, gates: set[str]) -> bool:
    """Whether the run failed only because these blocking checks failed."""
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            error = event.step_failure_data.error
            if error is None or "DagsterAssetCheckFailedError" not in (error.cls_name or ""):
                return False
    failed = {e.check_name for e in result.get_asset_check_evaluations() if not e.passed}
    blocking = {e.check_name for e in result.get_asset_check_evaluations() if not e.passed and e.blocking}
    return blocking <= gates and bool(failed & gates)


def _failure_text(result: Any, step: Step) -> str:
    messages = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE" and event.step_failure_data.error:
            messages.append(event.step_failure_data.error.message.strip())
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if not evaluation.passed:
                messages.append(f"check {evaluation.check_name} failed: {evaluation.description or ''}")
    detail = "\n".join(messages) or "see the run in the Dagster UI"
    return f"{step.asset} {step.partition or ''} failed in run {result.run_id}:\n{detail}"


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


def results_tables(store: Any) -> str:
    """The students' results from the store: per size, the champion beside teacher and baselines, the ablation."""
    import json

    from distill_pipeline.core.layout import ABLATION_PREFIX, CHAMPION_CURRENT, EVAL_REPORTS_ROOT, eval_report_prefix
    from distill_pipeline.core.reporting import markdown_table
    from distill_pipeline.core.store import ObjectNotFound
    from distill_pipeline.core.tables import published_partitions
    from distill_pipeline.students.ablation import TEST_SETS
    from distill_pipeline.students.evaluation import comparison_report
    from distill_pipeline.students.reports import (
        MAJORITY,
        STUDENT,
        TFIDF,
        read_report,
        reference_note,
        scores_by_test_set,
    )

    reports = [
        read_report(store, eval_report_prefix(size)) for size in published_partitions(store, EVAL_REPORTS_ROOT, "size")
    ]
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
    try:
        champion = json.loads(store.get_bytes(CHAMPION_CURRENT))
    except ObjectNotFound:
        champion = None
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
