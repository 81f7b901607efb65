"""The promotion gate: whether a challenger student earns the champion's place, which student
challenges, and the champion manifest.

Every decision here is a paired test on the same frozen test rows (``statistics.compare_paired``:
McNemar's exact test for accuracy, the paired bootstrap for other metrics). A challenger is
promoted only when it is significantly better than the reference (the current champion, or the
teacher against gold labels) on every decisive test set, by at least a margin, and significantly
worse on none; a win inside the noise is not a win. Models are given as their predicted labels
per test set, beside the labels they are scored against (``truth``), row for row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from distill_pipeline.students.ablation import TEST_SETS
from distill_pipeline.students.statistics import (
    DEFAULT_ALPHA,
    RESAMPLES,
    SEED,
    PairedComparison,
    compare_paired,
    metric_value,
)

CompareTo = Literal["champion", "teacher"]
COMPARE_TO: tuple[str, ...] = ("champion", "teacher")
CHAMPION_SCHEMA_VERSION = 1
Scores = Mapping[str, Mapping[str, Any]]
#: A model's predicted labels per test set, row for row with the truth they are scored against.
RowLabels = Mapping[str, Sequence[int] | np.ndarray]


@dataclass(frozen=True)
class Comparison:
    """The challenger against the reference on one test set."""

    test_set: str
    decisive: bool
    challenger: float | None
    reference: float | None
    passed: bool
    # The paired test (PairedComparison.to_dict()); None when the reference has no score there.
    paired: dict[str, Any] | None = None


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    # What the challenger was held against: "champion", "teacher", or "majority baseline" (no champion yet).
    reference: str
    metric: str
    margin: float
    reasons: tuple[str, ...]
    comparisons: tuple[Comparison, ...] = ()
    alpha: float = DEFAULT_ALPHA
    decisive: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Labels:
    """The task's label values and positive label, which every metric needs."""

    values: tuple[int, ...]
    positive: int | None


def _rows(labels: RowLabels | None, test_set: str) -> np.ndarray | None:
    if labels is None or test_set not in labels:
        return None
    return np.asarray(labels[test_set], dtype=np.int64)


def decide_promotion(
    truth: RowLabels,
    challenger: RowLabels,
    reference: RowLabels | None,
    labels: Labels,
    compare_to: CompareTo,
    *,
    metric: str = "accuracy",
    alpha: float = DEFAULT_ALPHA,
    margin: float = 0.0,
    decisive: Sequence[str] = ("in_distribution",),
    test_sets: Sequence[str] = tuple(TEST_SETS),
    floor: RowLabels | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PromotionDecision:
    """Promote only if the challenger is significantly better than the reference on every decisive
    test set (by at least ``margin``) and not significantly worse on any test set.

    ``compare_to="champion"``: ``reference`` holds the champion's predictions; with no champion yet
    (None) the challenger is held against ``floor`` (the majority baseline) the same way, so a
    student that learned nothing, or whose edge over the floor is noise, is never the first
    champion. ``compare_to="teacher"``: ``reference`` is the teacher's labels on the gold-labelled
    rows, ``truth`` the gold labels there; a test set without gold labels blocks the promotion.
    ``floor``, whatever the reference, must also be beaten outright on every test set.
    """
    if compare_to not in COMPARE_TO:
        raise ValueError(f"compare_to must be one of {COMPARE_TO}, not {compare_to!r}")
    if margin < 0:
        raise ValueError(f"margin must be non-negative, got {margin}")
    unknown = [name for name in decisive if name not in test_sets]
    if unknown or not decisive:
        raise ValueError(f"decisive test sets {list(decisive)} must be among {list(test_sets)}")
    reasons: list[str] = []
    reference_name = compare_to if reference is not None or compare_to == "teacher" else "majority baseline"

    def decision(promote: bool, comparisons: Sequence[Comparison] = ()) -> PromotionDecision:
        return PromotionDecision(
            promote, reference_name, metric, margin, tuple(reasons), tuple(comparisons), alpha, tuple(decisive)
        )

    missing = [name for name in test_sets if _rows(challenger, name) is None or _rows(truth, name) is None]
    if missing:
        needs = " against gold labels, which the teacher comparison needs" if compare_to == "teacher" else ""
        reasons.append(f"the challenger has no {metric}{needs} on {', '.join(missing)}")
        return decision(False)

    def score(model: RowLabels, name: str) -> float:
        return metric_value(truth[name], model[name], labels.values, metric, labels.positive)

    if floor is not None:
        for name in test_sets:
            if _rows(floor, name) is None:
                continue
            value, floor_value = score(challenger, name), score(floor, name)
            if value <= floor_value:
                reasons.append(f"{name}: {metric} {value:.4f} does not beat the baseline floor {floor_value:.4f}")
        if reasons:
            return decision(False)

    held_against = reference
    if compare_to == "champion" and reference is None:
        if floor is None:
            reasons.append("no current champion and no baseline to hold the first challenger against: promoted")
            return decision(True)
        reasons.append("no current champion: the challenger is held against the majority baseline")
        held_against = floor
    comparisons = []
    for name in test_sets:
        is_decisive = name in decisive
        against = _rows(held_against, name)
        value = score(challenger, name)
        if against is None:
            why = (
                "its labels are the test labels there (no gold labels), so it cannot be beaten on them"
                if compare_to == "teacher"
                else "the champion was not measured on it"
            )
            reasons.append(f"{name}: no {reference_name} {metric} to compare with: {why}")
            comparisons.append(Comparison(name, is_decisive, value, None, False))
            continue
        paired = compare_paired(
            truth[name],
            challenger[name],
            against,
            labels.values,
            metric,
            labels.positive,
            alpha=alpha,
            resamples=resamples,
            seed=seed,
        )
        if is_decisive:
            passed = paired.verdict == "better" and paired.difference.estimate >= margin
            needed = f"significantly better (p < {alpha:g}) by at least {margin:.4f}"
        else:
            passed = paired.verdict != "worse"
            needed = "not significantly worse"
        reasons.append(
            f"{name}{' (decisive)' if is_decisive else ''}: {metric} {paired.first:.4f} vs the {reference_name}'s "
            f"{paired.second:.4f} over {paired.rows:,} rows, {paired.text()}; needed {needed}: "
            f"{'passed' if passed else 'not passed'}"
        )
        comparisons.append(Comparison(name, is_decisive, paired.first, paired.second, passed, paired.to_dict()))
    return decision(all(c.passed for c in comparisons), comparisons)


@dataclass(frozen=True)
class Candidate:
    """An evaluated student: its partition, adapter, scores, predictions on the test rows and costs."""

    size_key: str
    train_id: str
    adapter_prefix: str
    train_rows: int
    scores: Scores
    variant: str = "base"
    # Predicted labels per test set, row for row with the truth given to best_candidate.
    predictions: RowLabels = field(default_factory=dict)
    trainable_parameters: int | None = None
    # Single-request latency (p50, ms) as measured by its evaluation.
    latency_ms: float | None = None

    @property
    def name(self) -> str:
        return f"{self.size_key}/{self.variant}"


@dataclass(frozen=True)
class CandidateChoice:
    """The challenger among the evaluated students, and why."""

    chosen: Candidate
    best: Candidate
    # The candidates not significantly worse than the best on any test set (the best included).
    tied: tuple[Candidate, ...]
    comparisons: dict[str, dict[str, PairedComparison]]
    reasons: tuple[str, ...]


def _cost(candidate: Candidate) -> tuple[float, float, float]:
    """Cheapest first: fewer training rows, then fewer trainable parameters, then lower latency."""
    unknown = float("inf")
    return (
        float(candidate.train_rows),
        float(candidate.trainable_parameters) if candidate.trainable_parameters is not None else unknown,
        candidate.latency_ms if candidate.latency_ms is not None else unknown,
    )


def best_candidate(
    candidates: Sequence[Candidate],
    truth: RowLabels,
    labels: Labels,
    *,
    metric: str = "accuracy",
    alpha: float = DEFAULT_ALPHA,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> CandidateChoice:
    """The best student by mean ``metric`` over the test sets, then the cheapest of those tied with it.

    A candidate ties with the best when a paired test finds it significantly worse on no test
    set: the difference is then noise, and the cheaper model (fewer training rows, then fewer
    trainable parameters, then lower latency) serves as well for less.
    """
    if not candidates:
        raise ValueError("no evaluated students to choose from")
    test_sets = list(truth)

    def mean(candidate: Candidate) -> float:
        values = [
            metric_value(truth[name], candidate.predictions[name], labels.values, metric, labels.positive)
            for name in test_sets
            if name in candidate.predictions
        ]
        return sum(values) / len(values) if values else float("-inf")

    means = {c.name: mean(c) for c in candidates}
    best = max(candidates, key=lambda c: (means[c.name], c.train_rows))
    comparisons: dict[str, dict[str, PairedComparison]] = {}
    tied = []
    for candidate in candidates:
        if candidate is best:
            tied.append(candidate)
            continue
        comparisons[candidate.name] = {
            name: compare_paired(
                truth[name],
                candidate.predictions[name],
                best.predictions[name],
                labels.values,
                metric,
                labels.positive,
                alpha=alpha,
                resamples=resamples,
                seed=seed,
            )
            for name in test_sets
            if name in candidate.predictions and name in best.predictions
        }
        if len(comparisons[candidate.name]) == len(test_sets) and all(
            c.verdict != "worse" for c in comparisons[candidate.name].values()
        ):
            tied.append(candidate)
    chosen = min(tied, key=lambda c: (*_cost(c), -means[c.name]))
    reasons = [f"best mean {metric}: {best.name} ({means[best.name]:.4f})"]
    if chosen is not best:
        reasons.append(
            f"{chosen.name} ({means[chosen.name]:.4f}) is not significantly worse on any test set "
            f"(p >= {alpha:g}) and is cheaper ({chosen.train_rows:,} training rows against {best.train_rows:,}"
            + (
                f", {chosen.trainable_parameters:,} trainable parameters against {best.trainable_parameters:,}"
                if chosen.trainable_parameters is not None and best.trainable_parameters is not None
                else ""
            )
            + "): it challenges"
        )
    others = [c.name for c in tied if c is not chosen and c is not best]
    if others:
        reasons.append(f"also tied with the best within the noise: {', '.join(others)}")
    return CandidateChoice(chosen, best, tuple(tied), comparisons, tuple(reasons))


def champion_manifest(
    candidate: Candidate,
    *,
    store_url: str,
    student: Mapping[str, Any],
    test_sets_version: int,
    decision: PromotionDecision,
    previous_train_id: str | None,
    promoted_at: str | None = None,
) -> dict[str, Any]:
    """The small JSON a server reads to find and describe the champion."""
    return {
        "schema_version": CHAMPION_SCHEMA_VERSION,
        "promoted_at": promoted_at or dt.datetime.now(dt.UTC).isoformat(),
        "store": store_url,
        "adapter_prefix": candidate.adapter_prefix,
        "adapter_dir": f"{candidate.adapter_prefix}adapter/",
        "train_id": candidate.train_id,
        "train_size": candidate.size_key,
        "variant": candidate.variant,
        "train_rows": candidate.train_rows,
        "student": dict(student),
        "test_sets_version": test_sets_version,
        "metrics": {name: dict(scores) for name, scores in candidate.scores.items()},
        "decision": decision.to_dict(),
        "previous_train_id": previous_train_id,
    }
