"""Training-set-size ablation: fit learning curves and say whether more data is worth buying.

Given the student's accuracy on both test sets at several training-set sizes, each test set gets
a learning curve ``acc(n) = a - b * n^(-c)`` (a power law approaching the asymptote ``a``). With
fewer than four sizes, or when that fit fails, a log-linear curve ``acc(n) = a + b * ln(n)`` is
used instead, and the analysis says so. The curve's rise from the largest size to twice it is the
expected gain from doubling the data, in accuracy points (percentage points); a gain below a
threshold means diminishing returns.

Given which test rows each size got right, the gain carries a 95% interval: the test rows are
resampled (the same rows for every size, since every size is scored on the same frozen sets),
each size's accuracy recomputed, the curve refitted and the gain measured again. A gain whose
interval includes zero is inside the noise, and the recommendation says so instead of deciding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from distill_pipeline.core.reporting import LineSeries, line_plot_markdown, markdown_table
from distill_pipeline.data.splitting import TEST_SETS

# The power law has three parameters; with three sizes it passes through every point and its
# extrapolation means nothing, so it needs one more.
POWER_LAW_MIN_SIZES = 4
DEFAULT_THRESHOLD_POINTS = 0.5
# Each resample refits the curve (a local search for the power law): a few hundred keep the
# interval's ends stable to about a tenth of a point and the whole analysis within a second or two.
GAIN_RESAMPLES = 200
# The power law only rises, so its resampled gains are never below zero: a lower end under a
# hundredth of a point (far below what any test set resolves) is zero.
GAIN_RESOLUTION_POINTS = 0.01
PLOT_COLORS = {"in_distribution": "#4f6bed", "balanced": "#e8793a"}
# Several starting exponents, because curve_fit is a local search.
_START_EXPONENTS = (0.2, 0.5, 1.0)


@dataclass(frozen=True)
class AblationPoint:
    train_rows: int
    accuracy_in_distribution: float
    accuracy_balanced: float

    def accuracy(self, test_set: str) -> float:
        return self.accuracy_in_distribution if test_set == "in_distribution" else self.accuracy_balanced


@dataclass(frozen=True)
class LearningCurve:
    """A fitted accuracy-vs-rows curve: ``power_law`` (a - b n^-c) or ``log_linear`` (a + b ln n)."""

    kind: str
    a: float
    b: float
    c: float | None
    reason: str

    def predict(self, rows: float | Sequence[float] | np.ndarray) -> np.ndarray:
        n = np.asarray(rows, dtype=float)
        if self.kind == "power_law":
            return self.a - self.b * n ** -(self.c or 0.0)
        return self.a + self.b * np.log(n)

    def doubling_gain(self, rows: float) -> float:
        """The expected accuracy gain (as a fraction) from ``rows`` to ``2 * rows`` training rows."""
        return float(self.predict(2 * rows) - self.predict(rows))

    @property
    def formula(self) -> str:
        if self.kind == "power_law":
            return f"acc(n) = {self.a:.4f} - {self.b:.4g} * n^-{self.c:.3f}"
        return f"acc(n) = {self.a:.4f} + {self.b:.4g} * ln(n)"


def _log_linear(rows: np.ndarray, accuracies: np.ndarray, reason: str) -> LearningCurve:
    b, a = np.polyfit(np.log(rows), accuracies, 1)
    return LearningCurve("log_linear", float(a), float(b), None, reason)


def _power_law(
    rows: np.ndarray, accuracies: np.ndarray, start_exponents: Sequence[float] = _START_EXPONENTS
) -> LearningCurve:
    from scipy.optimize import curve_fit

    # Fitted against n / n_max, where the scale is the gap to the asymptote at the largest size
    # (so in [0, 1]) rather than a number that grows with n^c and spans orders of magnitude.
    n_max = float(rows.max())
    x = rows / n_max

    def curve(x: np.ndarray, a: float, scale: float, c: float) -> np.ndarray:
        return a - scale * x ** (-c)

    a0 = min(1.0, float(accuracies.max()) + 0.01)
    gap_at_max = float(np.clip(a0 - accuracies[np.argmax(rows)], 1e-3, 1.0))
    best: tuple[float, np.ndarray] | None = None
    errors = []
    for c0 in start_exponents:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # covariance warnings: only the fit is used
                params, _ = curve_fit(
                    curve, x, accuracies, p0=(a0, gap_at_max, c0), bounds=([0.0, 0.0, 1e-3], [1.0, 1.0, 3.0])
                )
        except (RuntimeError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        residual = float(np.sum((curve(x, *params) - accuracies) ** 2))
        if np.all(np.isfinite(params)) and (best is None or residual < best[0]):
            best = (residual, params)
    if best is None:
        raise RuntimeError("; ".join(errors) or "no finite fit")
    a, scale, c = (float(p) for p in best[1])
    return LearningCurve("power_law", a, scale * n_max**c, c, f"power law over {len(np.unique(rows))} sizes")


def fit_learning_curve(train_rows: Sequence[int], accuracies: Sequence[float]) -> LearningCurve:
    """Fit accuracy (a fraction) against training rows; needs at least two distinct sizes."""
    rows = np.asarray(train_rows, dtype=float)
    acc = np.asarray(accuracies, dtype=float)
    sizes = len(np.unique(rows))
    if sizes < 2:
        raise ValueError("a learning curve needs at least two distinct training-set sizes")
    if sizes < POWER_LAW_MIN_SIZES:
        return _log_linear(rows, acc, f"log-linear: only {sizes} sizes, the power law needs {POWER_LAW_MIN_SIZES}")
    try:
        return _power_law(rows, acc)
    except RuntimeError as exc:
        return _log_linear(rows, acc, f"log-linear: the power-law fit failed ({exc})")


def recommendation(
    gains_points: Mapping[str, float],
    largest_rows: int,
    threshold_points: float = DEFAULT_THRESHOLD_POINTS,
    intervals: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[bool, str]:
    """Whether doubling the data is worth it, and a sentence saying so, from gains in points per test set.

    With ``intervals`` (each gain's 95% interval, in points), a gain counts only where its interval
    excludes zero: when no test set's does, the answer is that the gain is inside the noise.
    """
    doubling = f"doubling the training set from {largest_rows:,} to {2 * largest_rows:,} rows"
    if intervals is not None:
        measured = {name: gain for name, gain in gains_points.items() if intervals[name][0] > GAIN_RESOLUTION_POINTS}
        if not measured:
            each = ", ".join(
                f"{gains_points[name]:+.2f} [{low:+.2f}, {high:+.2f}] on the {TEST_SETS.get(name, name)}"
                for name, (low, high) in intervals.items()
            )
            return False, (
                f"Inside the noise: {doubling} has an expected gain whose 95% interval includes zero on every "
                f"test set ({each} points); more test rows or more sizes would tell."
            )
        gains_points = measured
    best = max(gains_points, key=lambda name: gains_points[name])
    if gains_points[best] >= threshold_points:
        others = "".join(
            f" ({gain:+.2f} on the {TEST_SETS.get(name, name)})" for name, gain in gains_points.items() if name != best
        )
        spread = f" (95% interval {intervals[best][0]:+.2f} to {intervals[best][1]:+.2f})" if intervals else ""
        text = (
            f"More data is worth it: {doubling} is expected to add {gains_points[best]:+.2f} points{spread} "
            f"on the {TEST_SETS.get(best, best)}{others}."
        )
        return True, text
    each = ", ".join(f"{gain:+.2f} on the {TEST_SETS.get(name, name)}" for name, gain in gains_points.items())
    text = (
        f"Diminishing returns: {doubling} is expected to add less than {threshold_points:.2f} points "
        f"on any test set ({each})."
    )
    return False, text


@dataclass(frozen=True)
class AblationAnalysis:
    points: tuple[AblationPoint, ...]
    curves: dict[str, LearningCurve]
    largest_rows: int
    doubling_gain_points: dict[str, float]
    threshold_points: float
    # None when there are too few sizes to judge.
    worthwhile: bool | None
    recommendation: str
    # Per test set, the doubling gain's 95% interval in points (given per-row results).
    gain_intervals: dict[str, tuple[float, float]] | None = None
    # Per test set and point, the accuracy's 95% interval (given per-row results).
    accuracy_intervals: dict[str, list[tuple[float, float]]] | None = None

    def plot_markdown(self) -> str:
        """Accuracy against training rows (log scale) for both test sets, with the fitted curves."""
        rows = [p.train_rows for p in self.points]
        series = []
        for name, title in TEST_SETS.items():
            color = PLOT_COLORS[name]
            series.append(LineSeries(title, rows, [p.accuracy(name) for p in self.points], "o", color))
            if name in self.curves:
                curve = self.curves[name]
                grid = np.geomspace(min(rows), 2 * max(rows), 100)
                label = f"{title}: {curve.kind.replace('_', '-')} fit"
                series.append(LineSeries(label, grid.tolist(), curve.predict(grid).tolist(), "--", color))
        return line_plot_markdown(
            series, title="Accuracy vs training-set size", xlabel="training rows", ylabel="accuracy", log_x=True
        )

    def markdown(self) -> str:
        """The recommendation, the measured points, the fitted curves and the plot."""

        def cell(index: int, name: str) -> str:
            value = f"{self.points[index].accuracy(name):.4f}"
            if self.accuracy_intervals:
                low, high = self.accuracy_intervals[name][index]
                value += f" [{low:.4f}, {high:.4f}]"
            return value

        table = markdown_table(
            [(f"{p.train_rows:,}", cell(i, "in_distribution"), cell(i, "balanced")) for i, p in enumerate(self.points)],
            ["training rows", "accuracy (in-distribution)", "accuracy (balanced)"],
        )
        fits = "\n".join(
            f"- {TEST_SETS[name]}: `{curve.formula}` ({curve.reason}); doubling gain "
            f"{self.doubling_gain_points[name]:+.2f} points"
            + (
                f" (95% interval {self.gain_intervals[name][0]:+.2f} to {self.gain_intervals[name][1]:+.2f})"
                if self.gain_intervals
                else ""
            )
            for name, curve in self.curves.items()
        )
        return "\n\n".join(part for part in (f"**{self.recommendation}**", table, fits, self.plot_markdown()) if part)


def _points(raw: Iterable[AblationPoint | Sequence[float]]) -> tuple[AblationPoint, ...]:
    """The points, checked, in the order given."""
    points = []
    for item in raw:
        point = item if isinstance(item, AblationPoint) else AblationPoint(int(item[0]), float(item[1]), float(item[2]))
        if point.train_rows <= 0:
            raise ValueError(f"training-set size must be positive, got {point.train_rows}")
        for value in (point.accuracy_in_distribution, point.accuracy_balanced):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"accuracy must be a fraction in [0, 1], got {value} at {point.train_rows} rows")
        points.append(point)
    return tuple(points)


def _resampled_accuracies(correct: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Each size's accuracy under ``resamples`` bootstrap draws of the test rows, shape (resamples, sizes).

    The rows are drawn once for all sizes (they share the test set). A row's outcome across the
    sizes is a pattern of right and wrong; the accuracies depend only on how many rows show each
    pattern, so the pattern counts are drawn from a multinomial instead of row indices.
    """
    patterns, inverse = np.unique(correct.T, axis=0, return_inverse=True)
    counts = np.bincount(inverse.ravel(), minlength=len(patterns))
    rows = correct.shape[1]
    draws = np.random.default_rng(seed).multinomial(rows, counts / rows, size=resamples)
    return draws @ patterns.astype(float) / rows


def gain_interval(
    train_rows: Sequence[int],
    correct: np.ndarray,
    *,
    resamples: int = GAIN_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """The 95% interval of the doubling gain (in points), refitting the curve on resampled test rows.

    ``correct`` is (sizes, rows): whether each size's student got each test row right.
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or correct.shape[0] != len(train_rows) or correct.shape[1] == 0:
        raise ValueError(f"correct must be (sizes={len(train_rows)}, rows > 0), not {correct.shape}")
    largest = max(train_rows)
    rows = np.asarray(train_rows, dtype=float)
    fitted = fit_learning_curve(train_rows, correct.mean(axis=1))
    gains = []
    for accuracies in _resampled_accuracies(correct, resamples, seed):
        try:
            if fitted.kind == "power_law":
                # One local search per resample, started from the measured curve's exponent: a
                # resample's curve lies near it, and three starts each would triple the cost.
                curve = _power_law(rows, accuracies, (fitted.c or _START_EXPONENTS[1],))
            else:
                curve = fit_learning_curve(train_rows, accuracies)
            gains.append(100 * curve.doubling_gain(largest))
        except (RuntimeError, ValueError):
            continue
    if not gains:
        raise RuntimeError("no resample could be fitted")
    tail = (1 - confidence) / 2
    low, high = np.quantile(gains, [tail, 1 - tail])
    return float(low), float(high)


def analyse_ablation(
    points: Iterable[AblationPoint | Sequence[float]],
    *,
    threshold_points: float = DEFAULT_THRESHOLD_POINTS,
    correct: Mapping[str, np.ndarray] | None = None,
    resamples: int = GAIN_RESAMPLES,
    seed: int = 0,
) -> AblationAnalysis:
    """Fit both test sets' learning curves and recommend for or against more data.

    ``points`` are ``(train_rows, accuracy_in_distribution, accuracy_balanced)``, accuracies as
    fractions. Gains and the threshold are in accuracy points (0.5 means half a percentage point).
    ``correct`` (per test set, a boolean array of shape (points, rows) in the order of ``points``)
    gives the gains and accuracies their 95% intervals, and the recommendation its noise check.
    """
    given = _points(points)
    if not given:
        raise ValueError("no ablation points")
    order = sorted(range(len(given)), key=lambda i: given[i].train_rows)
    ordered = tuple(given[i] for i in order)
    rows_correct = None
    if correct is not None:
        rows_correct = {name: np.asarray(correct[name], dtype=bool)[order] for name in TEST_SETS}
        for name, matrix in rows_correct.items():
            measured = matrix.mean(axis=1)
            stated = [p.accuracy(name) for p in ordered]
            if not np.allclose(measured, stated, atol=1e-9):
                raise ValueError(f"the per-row results on {name} do not give the stated accuracies")
    largest = max(p.train_rows for p in ordered)
    if len({p.train_rows for p in ordered}) < 2:
        text = f"Cannot judge: only one training-set size ({largest:,} rows) was measured; a learning curve needs two."
        return AblationAnalysis(ordered, {}, largest, {}, threshold_points, None, text)
    rows = [p.train_rows for p in ordered]
    curves = {name: fit_learning_curve(rows, [p.accuracy(name) for p in ordered]) for name in TEST_SETS}
    gains = {name: 100 * curve.doubling_gain(largest) for name, curve in curves.items()}
    gain_intervals = accuracy_intervals = None
    if rows_correct is not None:
        gain_intervals = {
            name: gain_interval(rows, matrix, resamples=resamples, seed=seed) for name, matrix in rows_correct.items()
        }
        accuracy_intervals = {}
        for name, matrix in rows_correct.items():
            resampled = _resampled_accuracies(matrix, 4000, seed)
            low, high = np.quantile(resampled, [0.025, 0.975], axis=0)
            accuracy_intervals[name] = [(float(lo), float(hi)) for lo, hi in zip(low, high, strict=True)]
    worthwhile, text = recommendation(gains, largest, threshold_points, gain_intervals)
    fits = "; ".join(f"{TEST_SETS[name]}: {curve.reason}" for name, curve in curves.items())
    return AblationAnalysis(
        ordered,
        curves,
        largest,
        gains,
        threshold_points,
        worthwhile,
        f"{text} Fits: {fits}.",
        gain_intervals,
        accuracy_intervals,
    )
