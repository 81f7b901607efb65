"""The promotion gate: whether a challenger student earns the champion's place, and the champion manifest.

A challenger is promoted only if it beats the reference on every frozen test set by at least a
margin: the current champion (the default), or the teacher. The teacher can only be compared
with on a test set that has gold labels, since the test labels are otherwise the teacher's own.
Scores are given as ``{test set: {metric: value}}``, measured on the same test-set version.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from distill_pipeline.students.ablation import TEST_SETS

CompareTo = Literal["champion", "teacher"]
COMPARE_TO: tuple[str, ...] = ("champion", "teacher")
CHAMPION_SCHEMA_VERSION = 1
Scores = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Comparison:
    """The challenger against the reference on one test set."""

    test_set: str
    challenger: float | None
    reference: float | None
    passed: bool


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    # What the challenger was held against: "champion", "teacher", or "none" (no champion yet).
    reference: str
    metric: str
    margin: float
    reasons: tuple[str, ...]
    comparisons: tuple[Comparison, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value(scores: Scores | None, test_set: str, metric: str) -> float | None:
    if scores is None or test_set not in scores:
        return None
    value = scores[test_set].get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def decide_promotion(
    challenger: Scores,
    champion: Scores | None,
    teacher: Scores | None,
    margin: float,
    compare_to: CompareTo,
    *,
    metric: str = "accuracy",
    test_sets: Sequence[str] = tuple(TEST_SETS),
    floor: Scores | None = None,
) -> PromotionDecision:
    """Promote only if the challenger beats the reference on every test set by at least ``margin``.

    ``compare_to="champion"``: the reference is ``champion``; with no champion yet the challenger
    is promoted if it qualifies. ``compare_to="teacher"``: the reference is ``teacher``, whose
    scores exist only against gold labels; a test set without them blocks the promotion. ``floor``
    (say, the majority baseline's scores) must be beaten outright on every test set, whatever the
    reference, so that a student that learned nothing never becomes the first champion.
    """
    if compare_to not in COMPARE_TO:
        raise ValueError(f"compare_to must be one of {COMPARE_TO}, not {compare_to!r}")
    if margin < 0:
        raise ValueError(f"margin must be non-negative, got {margin}")
    reasons: list[str] = []

    def decision(promote: bool, reference: str, comparisons: Sequence[Comparison] = ()) -> PromotionDecision:
        return PromotionDecision(promote, reference, metric, margin, tuple(reasons), tuple(comparisons))

    missing = [name for name in test_sets if _value(challenger, name, metric) is None]
    if missing:
        needs = " against gold labels, which the teacher comparison needs" if compare_to == "teacher" else ""
        reasons.append(f"the challenger has no {metric}{needs} on {', '.join(missing)}")
        return decision(False, compare_to)
    if floor is not None:
        for name in test_sets:
            floor_value = _value(floor, name, metric)
            value = _value(challenger, name, metric)
            if floor_value is not None and value is not None and value <= floor_value:
                reasons.append(f"{name}: {metric} {value:.4f} does not beat the baseline floor {floor_value:.4f}")
        if reasons:
            return decision(False, compare_to)

    if compare_to == "champion" and champion is None:
        reasons.append("no current champion: the first challenger that qualifies is promoted")
        return decision(True, "none")
    reference_scores = champion if compare_to == "champion" else teacher
    comparisons = []
    for name in test_sets:
        value = _value(challenger, name, metric)
        reference = _value(reference_scores, name, metric)
        if reference is None:
            why = (
                "its labels are the test labels there (no gold labels), so it cannot be beaten on them"
                if compare_to == "teacher"
                else "the champion was not measured on it"
            )
            reasons.append(f"{name}: no {compare_to} {metric} to compare with: {why}")
            comparisons.append(Comparison(name, value, None, False))
            continue
        assert value is not None
        passed = value > reference and value - reference >= margin
        verdict = "beats" if passed else "does not beat"
        reasons.append(
            f"{name}: {metric} {value:.4f} {verdict} the {compare_to}'s {reference:.4f} by the margin {margin:.4f} "
            f"({value - reference:+.4f})"
        )
        comparisons.append(Comparison(name, value, reference, passed))
    return decision(all(c.passed for c in comparisons), compare_to, comparisons)


@dataclass(frozen=True)
class Candidate:
    """An evaluated student: its size partition, adapter and scores."""

    size_key: str
    train_id: str
    adapter_prefix: str
    train_rows: int
    scores: Scores


def best_candidate(candidates: Sequence[Candidate], metric: str = "accuracy") -> Candidate:
    """The candidate with the best mean ``metric`` over the test sets; ties go to more training rows."""
    if not candidates:
        raise ValueError("no evaluated students to choose from")

    def mean(candidate: Candidate) -> float:
        values = [_value(candidate.scores, name, metric) for name in candidate.scores]
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else float("-inf")

    return max(candidates, key=lambda c: (mean(c), c.train_rows))


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
        "train_rows": candidate.train_rows,
        "student": dict(student),
        "test_sets_version": test_sets_version,
        "metrics": {name: dict(scores) for name, scores in candidate.scores.items()},
        "decision": decision.to_dict(),
        "previous_train_id": previous_train_id,
    }
