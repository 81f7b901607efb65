"""Honest numbers: 95% intervals over test rows, and paired tests of two models on the same rows.

Every statistic here depends on the test rows only through the *cell* each row falls in: its
reference label and prediction (a confusion-matrix cell), or its reference label and two models'
predictions. Resampling n rows with replacement therefore gives cell counts distributed exactly
as a multinomial draw of n over the observed cell frequencies, so the bootstrap draws the counts
(a handful of cells) rather than row indices (thousands): several thousand resamples cost
milliseconds whatever the test-set size, with the same distribution as the row bootstrap.

Accuracy comparisons use McNemar's exact test (a binomial test on the rows where exactly one of
the two models is right); precision, recall and F1 comparisons use the paired bootstrap of the
difference. numpy and scipy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4000
SEED = 0
DEFAULT_ALPHA = 0.05
#: The metrics computed from a confusion matrix (ROC AUC needs scores, not labels).
METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1")
Verdict = Literal["better", "worse", "tied"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval."""

    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def text(self, *, points: bool = False, signed: bool = False) -> str:
        """``0.912 [0.887, 0.934]``, or in percentage points (``+1.2 [-0.4, +2.9] pts``)."""
        if points:
            sign = "+" if signed else ""
            return f"{100 * self.estimate:{sign}.1f} [{100 * self.low:{sign}.1f}, {100 * self.high:{sign}.1f}] pts"
        sign = "+" if signed else ""
        return f"{self.estimate:{sign}.3f} [{self.low:{sign}.3f}, {self.high:{sign}.3f}]"


def _codes(values: Sequence[int] | np.ndarray, label_values: Sequence[int], what: str) -> np.ndarray:
    """Labels as indices into ``label_values``; an unknown label is an error, not a silent miss."""
    array = np.asarray(values).astype(np.int64, copy=False).ravel()
    # K is a handful of labels: an (n, K) comparison is the plainest exact lookup.
    matches = array[:, None] == np.asarray(label_values, dtype=np.int64)[None, :]
    known = matches.any(axis=1)
    if not known.all():
        unknown = sorted(set(array[~known].tolist()))
        raise ValueError(f"{what} labels {unknown} are not among the labels {list(label_values)}")
    return matches.argmax(axis=1)


def _positive_index(label_values: Sequence[int], positive: int | None) -> int | None:
    """The positive label's column for a two-label task that has one; None means macro averages."""
    if positive is None or len(label_values) != 2:
        return None
    if positive not in label_values:
        raise ValueError(f"positive label {positive} is not among the labels {list(label_values)}")
    return list(label_values).index(positive)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # scikit-learn's zero_division=0: a precision with no positive predictions is 0, not NaN.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), 0.0)


def metric_from_confusion(confusion: np.ndarray, metric: str, positive_index: int | None) -> np.ndarray:
    """``metric`` of confusion matrices ``[..., reference, predicted]`` (counts), one value per matrix.

    Precision, recall and F1 are of the positive label (``positive_index``) or, without one, macro
    averages over the labels, as ``evaluate_predictions`` reports them.
    """
    counts = np.asarray(confusion, dtype=float)
    total = counts.sum(axis=(-2, -1))
    if metric == "accuracy":
        return _divide(np.trace(counts, axis1=-2, axis2=-1), total)
    if metric not in METRICS:
        raise ValueError(f"no interval for metric {metric!r}: one of {', '.join(METRICS)}")
    true_positive = np.diagonal(counts, axis1=-2, axis2=-1)
    predicted = counts.sum(axis=-2)
    actual = counts.sum(axis=-1)
    if metric == "precision":
        per_label = _divide(true_positive, predicted)
    elif metric == "recall":
        per_label = _divide(true_positive, actual)
    else:
        per_label = _divide(2 * true_positive, predicted + actual)
    return per_label[..., positive_index] if positive_index is not None else per_label.mean(axis=-1)


def _quantiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _multinomial_draws(cells: np.ndarray, n_cells: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The observed counts per cell and ``resamples`` bootstrap draws of them, shape (resamples, cells)."""
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    counts = np.bincount(cells, minlength=n_cells)
    rows = int(counts.sum())
    if rows == 0:
        raise ValueError("no rows to resample")
    draws = np.random.default_rng(seed).multinomial(rows, counts / rows, size=resamples)
    return counts, draws


def metric_value(
    reference: Sequence[int] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    label_values: Sequence[int],
    metric: str = "accuracy",
    positive: int | None = None,
) -> float:
    """``metric`` of ``predicted`` against ``reference``, from their confusion matrix."""
    k = len(label_values)
    truth, guess = _codes(reference, label_values, "reference"), _codes(predicted, label_values, "predicted")
    if len(truth) != len(guess):
        raise ValueError(f"{len(truth)} reference labels but {len(guess)} predictions")
    confusion = np.bincount(truth * k + guess, minlength=k * k).reshape(k, k)
    return float(metric_from_confusion(confusion, metric, _positive_index(label_values, positive)))


def bootstrap_interval(
    reference: Sequence[int] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    label_values: Sequence[int],
    metric: str = "accuracy",
    positive: int | None = None,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """``metric`` with its percentile-bootstrap interval over the test rows (seeded, reproducible)."""
    k = len(label_values)
    truth, guess = _codes(reference, label_values, "reference"), _codes(predicted, label_values, "predicted")
    if len(truth) != len(guess):
        raise ValueError(f"{len(truth)} reference labels but {len(guess)} predictions")
    counts, draws = _multinomial_draws(truth * k + guess, k * k, resamples, seed)
    index = _positive_index(label_values, positive)
    estimate = float(metric_from_confusion(counts.reshape(k, k), metric, index))
    low, high = _quantiles(metric_from_confusion(draws.reshape(-1, k, k), metric, index), confidence)
    return Interval(estimate, low, high, confidence)


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test: rows only the first model got right, only the second, and the p-value."""

    only_first: int
    only_second: int
    p_value: float


def mcnemar_exact(first_correct: Sequence[bool] | np.ndarray, second_correct: Sequence[bool] | np.ndarray) -> McNemar:
    """Two-sided exact McNemar test of two models' correctness on the same rows.

    Under the null hypothesis that both models are equally accurate, each discordant row (one model
    right, the other wrong) is a fair coin: the p-value is the two-sided binomial tail of the
    smaller discordant count, ``min(1, 2 * P[X <= min(b, c)])`` with X ~ Binomial(b + c, 1/2).
    """
    from scipy.stats import binom

    first, second = np.asarray(first_correct, dtype=bool), np.asarray(second_correct, dtype=bool)
    if first.shape != second.shape:
        raise ValueError(f"{first.size} rows against {second.size}: a paired test needs the same rows")
    only_first, only_second = int(np.sum(first & ~second)), int(np.sum(~first & second))
    discordant = only_first + only_second
    if discordant == 0:
        return McNemar(0, 0, 1.0)
    p_value = min(1.0, 2.0 * float(binom.cdf(min(only_first, only_second), discordant, 0.5)))
    return McNemar(only_first, only_second, p_value)


def paired_bootstrap(
    reference: Sequence[int] | np.ndarray,
    first: Sequence[int] | np.ndarray,
    second: Sequence[int] | np.ndarray,
    label_values: Sequence[int],
    metric: str = "accuracy",
    positive: int | None = None,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[Interval, float]:
    """The difference ``metric(first) - metric(second)`` on the same rows, resampled together.

    Returns its interval and a two-sided bootstrap p-value (twice the share of resamples on the
    far side of zero, at most 1).
    """
    k = len(label_values)
    truth = _codes(reference, label_values, "reference")
    a, b = _codes(first, label_values, "first model's"), _codes(second, label_values, "second model's")
    if not len(truth) == len(a) == len(b):
        raise ValueError(
            f"{len(truth)} reference labels, {len(a)} and {len(b)} predictions: a paired test needs the same rows"
        )
    counts, draws = _multinomial_draws((truth * k + a) * k + b, k**3, resamples, seed)
    index = _positive_index(label_values, positive)

    def difference(cells: np.ndarray) -> np.ndarray:
        cube = cells.reshape(*cells.shape[:-1], k, k, k)
        return metric_from_confusion(cube.sum(axis=-1), metric, index) - metric_from_confusion(
            cube.sum(axis=-2), metric, index
        )

    estimate = float(difference(counts))
    resampled = difference(draws)
    low, high = _quantiles(resampled, confidence)
    p_value = min(1.0, 2.0 * float(min(np.mean(resampled <= 0), np.mean(resampled >= 0))))
    return Interval(estimate, low, high, confidence), p_value


@dataclass(frozen=True)
class PairedComparison:
    """Two models on the same rows: their scores, the difference's interval, the test and its verdict.

    ``verdict`` is ``better`` or ``worse`` (for the first model) only when the test is significant
    at ``alpha``; a difference inside the noise is ``tied``, whatever its sign.
    """

    metric: str
    rows: int
    first: float
    second: float
    difference: Interval
    test: str
    p_value: float
    alpha: float
    verdict: Verdict
    only_first: int | None = None
    only_second: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """``+1.2 [-0.4, +2.9] pts, McNemar exact p=0.14: tied``."""
        return f"{self.difference.text(points=True, signed=True)}, {self.test} p={self.p_value:.3g}: {self.verdict}"


def compare_paired(
    reference: Sequence[int] | np.ndarray,
    first: Sequence[int] | np.ndarray,
    second: Sequence[int] | np.ndarray,
    label_values: Sequence[int],
    metric: str = "accuracy",
    positive: int | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PairedComparison:
    """Whether ``first`` is significantly better than, worse than, or tied with ``second`` on ``metric``.

    Accuracy: McNemar's exact test. Other metrics: the paired bootstrap's p-value. The difference's
    interval is always the paired bootstrap's, at CONFIDENCE.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
    interval, bootstrap_p = paired_bootstrap(
        reference, first, second, label_values, metric, positive, resamples=resamples, seed=seed
    )
    truth = np.asarray(reference)
    first_score = metric_value(reference, first, label_values, metric, positive)
    second_score = metric_value(reference, second, label_values, metric, positive)
    only_first = only_second = None
    if metric == "accuracy":
        exact = mcnemar_exact(np.asarray(first) == truth, np.asarray(second) == truth)
        test, p_value, only_first, only_second = "McNemar exact", exact.p_value, exact.only_first, exact.only_second
    else:
        test, p_value = "paired bootstrap", bootstrap_p
    verdict: Verdict = "tied"
    if p_value < alpha and first_score != second_score:
        verdict = "better" if first_score > second_score else "worse"
    return PairedComparison(
        metric, len(truth), first_score, second_score, interval, test, p_value, alpha, verdict, only_first, only_second
    )
