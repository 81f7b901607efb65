"""The experiments report: every student variant at every training-set size, side by side.

One row per (size, variant) that has a current evaluation: accuracy and F1 on each frozen test
set with their 95% intervals, what the variant changed from base, training time, trainable
parameters, latency and the cost of a thousand predictions, and the paired comparison with the
base variant at the same size (the same rows, so McNemar's test for accuracy and the paired
bootstrap for F1). The recommendation is the champion's own rule (``promotion.best_candidate``):
the best student, or the cheapest one tied with it within the noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.core.task import BASE_VARIANT
from distill_pipeline.students.ablation import TEST_SETS
from distill_pipeline.students.promotion import Candidate, CandidateChoice, Labels, RowLabels, best_candidate
from distill_pipeline.students.statistics import (
    DEFAULT_ALPHA,
    RESAMPLES,
    SEED,
    Interval,
    PairedComparison,
    bootstrap_interval,
    compare_paired,
)

#: The metrics shown per test set, each with its interval.
REPORTED_METRICS = ("accuracy", "f1")
#: What an hour of the serving machine costs when nothing else is configured (US dollars).
DEFAULT_USD_PER_HOUR = 1.0
# safetensors refuses headers over 100 MB; so does this reader.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class ExperimentRun:
    """One evaluated student: its partition, what its variant changed, its predictions and its costs."""

    size_key: str
    variant: str
    change: str
    train_id: str
    adapter_prefix: str
    train_rows: int
    # Predicted labels per test set, row for row with the truth the report is given.
    predictions: RowLabels
    train_seconds: float | None = None
    trainable_parameters: int | None = None
    # Single-request p50 latency (ms) and batched throughput (rows/s), from the evaluation.
    latency_ms: float | None = None
    rows_per_s: float | None = None

    @property
    def name(self) -> str:
        return f"{self.size_key}/{self.variant}"

    def candidate(self) -> Candidate:
        return Candidate(
            self.size_key,
            self.train_id,
            self.adapter_prefix,
            self.train_rows,
            {},
            self.variant,
            self.predictions,
            self.trainable_parameters,
            self.latency_ms,
        )


def cost_per_1k(rows_per_s: float | None, usd_per_hour: float) -> float | None:
    """US dollars for a thousand predictions at the measured batched throughput on a machine at ``usd_per_hour``."""
    if rows_per_s is None or not math.isfinite(rows_per_s) or rows_per_s <= 0:
        return None
    return 1000.0 / rows_per_s * usd_per_hour / 3600.0


@dataclass(frozen=True)
class ExperimentsReport:
    runs: tuple[ExperimentRun, ...]
    # Per run name, per test set, per metric: the score and its interval.
    scores: dict[str, dict[str, dict[str, Interval]]]
    # Per run name (other than base), per test set, per metric: the paired comparison with base at its size.
    versus_base: dict[str, dict[str, dict[str, PairedComparison]]]
    choice: CandidateChoice
    usd_per_hour: float
    alpha: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def recommendation(self) -> str:
        chosen = self.choice.chosen
        return f"Recommended: {chosen.name} (" + "; ".join(self.choice.reasons) + ")."

    def to_dict(self) -> dict[str, Any]:
        entries = []
        for run in self.runs:
            entries.append(
                {
                    "size": run.size_key,
                    "variant": run.variant,
                    "change": run.change,
                    "train_id": run.train_id,
                    "train_rows": run.train_rows,
                    "train_seconds": run.train_seconds,
                    "trainable_parameters": run.trainable_parameters,
                    "latency_p50_ms_single_request": run.latency_ms,
                    "rows_per_s_batched": run.rows_per_s,
                    "usd_per_1k_predictions": cost_per_1k(run.rows_per_s, self.usd_per_hour),
                    "scores": {
                        test_set: {metric: interval.to_dict() for metric, interval in metrics.items()}
                        for test_set, metrics in self.scores[run.name].items()
                    },
                    "versus_base": {
                        test_set: {metric: comparison.to_dict() for metric, comparison in metrics.items()}
                        for test_set, metrics in self.versus_base.get(run.name, {}).items()
                    },
                }
            )
        return {
            "runs": entries,
            "recommended": {"size": self.choice.chosen.size_key, "variant": self.choice.chosen.variant},
            "best": {"size": self.choice.best.size_key, "variant": self.choice.best.variant},
            "tied_with_best": [c.name for c in self.choice.tied],
            "recommendation": self.recommendation,
            "usd_per_hour": self.usd_per_hour,
            "alpha": self.alpha,
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """The spreadsheet: a row per size and variant."""
        columns = ["size", "variant", "change", "training rows"]
        for test_set in TEST_SETS:
            columns += [f"{metric} {test_set}" for metric in REPORTED_METRICS]
        columns += [
            "training s",
            "trainable params",
            "p50 ms (1 request)",
            f"$ / 1k predictions (at ${self.usd_per_hour:g}/h)",
            *(f"vs base, accuracy {test_set}" for test_set in TEST_SETS),
        ]
        rows = []
        for run in self.runs:
            cells: list[Any] = [run.size_key, run.variant, run.change, f"{run.train_rows:,}"]
            for test_set in TEST_SETS:
                for metric in REPORTED_METRICS:
                    interval = self.scores[run.name].get(test_set, {}).get(metric)
                    cells.append(interval.text() if interval else "–")
            cost = cost_per_1k(run.rows_per_s, self.usd_per_hour)
            cells += [
                f"{run.train_seconds:,.1f}" if run.train_seconds is not None else "–",
                f"{run.trainable_parameters:,}" if run.trainable_parameters is not None else "–",
                f"{run.latency_ms:.1f}" if run.latency_ms is not None else "–",
                f"{cost:.5f}" if cost is not None else "–",
            ]
            for test_set in TEST_SETS:
                comparison = self.versus_base.get(run.name, {}).get(test_set, {}).get("accuracy")
                cells.append(comparison.text() if comparison else "(base)" if run.variant == BASE_VARIANT else "–")
            rows.append(cells)
        return markdown_table(rows, columns)

    def markdown(self) -> str:
        parts = [
            f"**{self.recommendation}**",
            "Scores are against the test labels, each with its 95% bootstrap interval over the test rows. "
            f"Each variant is compared with base at the same size on the same rows (McNemar's exact test for "
            f"accuracy, the paired bootstrap for F1); a difference with p >= {self.alpha:g} is tied, inside the noise.",
            self.table(),
        ]
        f1_rows = [
            (run.name, test_set, comparison.text())
            for run in self.runs
            for test_set, metrics in self.versus_base.get(run.name, {}).items()
            for metric, comparison in metrics.items()
            if metric == "f1"
        ]
        if f1_rows:
            parts += [
                "#### F1 against base at the same size",
                markdown_table(f1_rows, ["run", "test set", "F1 difference"]),
            ]
        parts += [f"- {note}" for note in self.notes]
        return "\n\n".join(parts)


def compare_experiments(
    runs: Sequence[ExperimentRun],
    truth: Mapping[str, Sequence[int] | np.ndarray],
    labels: Labels,
    *,
    metric: str = "accuracy",
    alpha: float = DEFAULT_ALPHA,
    usd_per_hour: float = DEFAULT_USD_PER_HOUR,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> ExperimentsReport:
    """Score every run with intervals, compare each variant with base at its size, and recommend one."""
    if not runs:
        raise ValueError("no evaluated students to report on")
    if usd_per_hour <= 0 or not math.isfinite(usd_per_hour):
        raise ValueError(f"usd_per_hour must be a positive number, not {usd_per_hour}")
    ordered = tuple(sorted(runs, key=lambda r: (r.train_rows, r.variant != BASE_VARIANT, r.variant)))
    names = [run.name for run in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"a size and variant appears twice among {names}")

    def scored(run: ExperimentRun) -> dict[str, dict[str, Interval]]:
        return {
            test_set: {
                m: bootstrap_interval(
                    truth[test_set],
                    run.predictions[test_set],
                    labels.values,
                    m,
                    labels.positive,
                    resamples=resamples,
                    seed=seed,
                )
                for m in REPORTED_METRICS
            }
            for test_set in truth
            if test_set in run.predictions
        }

    scores = {run.name: scored(run) for run in ordered}
    base_at = {run.size_key: run for run in ordered if run.variant == BASE_VARIANT}
    versus_base: dict[str, dict[str, dict[str, PairedComparison]]] = {}
    notes = []
    for run in ordered:
        if run.variant == BASE_VARIANT:
            continue
        base = base_at.get(run.size_key)
        if base is None:
            notes.append(f"{run.name} has no base student evaluated at {run.size_key} to compare with")
            continue
        versus_base[run.name] = {
            test_set: {
                m: compare_paired(
                    truth[test_set],
                    run.predictions[test_set],
                    base.predictions[test_set],
                    labels.values,
                    m,
                    labels.positive,
                    alpha=alpha,
                    resamples=resamples,
                    seed=seed,
                )
                for m in REPORTED_METRICS
            }
            for test_set in truth
            if test_set in run.predictions and test_set in base.predictions
        }
    choice = best_candidate(
        [run.candidate() for run in ordered], truth, labels, metric=metric, alpha=alpha, resamples=resamples, seed=seed
    )
    return ExperimentsReport(ordered, scores, versus_base, choice, usd_per_hour, alpha, tuple(notes))


def stored_parameters(adapter_dir: Path) -> int:
    """The number of parameters a published adapter folder stores: what training changed.

    Read from the safetensors headers (an 8-byte length, then JSON with each tensor's shape), so
    no weights are loaded. For a LoRA adapter these are the LoRA matrices and any trained head;
    for a full fine-tune, the whole model.
    """
    total = 0
    files = sorted(Path(adapter_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {adapter_dir}")
    for path in files:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= MAX_HEADER_BYTES:
                raise ValueError(f"{path} has no readable safetensors header")
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total
