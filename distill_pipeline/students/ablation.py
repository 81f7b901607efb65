"""Training-set-size ablation: fit learning curves and say whether more data is worth buying.

Given the student's accuracy on both test sets at several training-set sizes, each test set gets
a learning curve ``acc(n) = a - b * n^(-c)`` (a power law approaching the asymptote ``a``). With
fewer than four sizes, or when that fit fails, a log-linear curve ``acc(n) = a + b * ln(n)`` is
used instead, and the analysis says so. The curve's rise from the largest size to twice it is the
expected gain from doubling the data, in accuracy points (percentage points); a gain below a
threshold means diminishing returns.
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


def _power_law(rows: np.ndarray, accuracies: np.ndarray) -> LearningCurve:
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
    for c0 in _START_EXPONENTS:
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
    gains_points: Mapping[str, float], largest_rows: int, threshold_points: float = DEFAULT_THRESHOLD_POINTS
) -> tuple[bool, str]:
    """Whether doubling the data is worth it, and a sentence saying so, from gains in points per test set."""
    best = max(gains_points, key=lambda name: gains_points[name])
    doubling = f"doubling the training set from {largest_rows:,} to {2 * largest_rows:,} rows"
    if gains_points[best] >= threshold_points:
        others = "".join(
            f" ({gain:+.2f} on the {TEST_SETS.get(name, name)})" for name, gain in gains_points.items() if name != best
        )
        text = (
            f"More data is worth it: {doubling} is expected to add {gains_points[best]:+.2f} points "
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
        table = markdown_table(
            [
                (f"{p.train_rows:,}", f"{p.accuracy_in_distribution:.4f}", f"{p.accuracy_balanced:.4f}")
                for p in self.points
            ],
            ["training rows", "accuracy (in-distribution)", "accuracy (balanced)"],
        )
        fits = "\n".join(
            f"- {TEST_SETS[name]}: `{curve.formula}` ({curve.reason}); doubling gain "
            f"{self.doubling_gain_points[name]:+.2f} points"
            for name, curve in self.curves.items()
        )
        return "\n\n".join(part for part in (f"**{self.recommendation}**", table, fits, self.plot_markdown()) if part)


def _points(raw: Iterable[AblationPoint | Sequence[float]]) -> tuple[AblationPoint, ...]:
    points = []
    for item in raw:
        point = item if isinstance(item, AblationPoint) else AblationPoint(int(item[0]), float(item[1]), float(item[2]))
        if point.train_rows <= 0:
            raise ValueError(f"training-set size must be positive, got {point.train_rows}")
        for value in (point.accuracy_in_distribution, point.accuracy_balanced):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"accuracy must be a fraction in [0, 1], got {value} at {point.train_rows} rows")
        points.append(point)
    return tuple(sorted(points, key=lambda p: p.train_rows))


def analyse_ablation(
    points: Iterable[AblationPoint | Sequence[float]], *, threshold_points: float = DEFAULT_THRESHOLD_POINTS
) -> AblationAnalysis:
    """Fit both test sets' learning curves and recommend for or against more data.

    ``points`` are ``(train_rows, accuracy_in_distribution, accuracy_balanced)``, accuracies as
    fractions. Gains and the threshold are in accuracy points (0.5 means half a percentage point).
    """
    ordered = _points(points)
    if not ordered:
        raise ValueError("no ablation points")
    largest = max(p.train_rows for p in ordered)
    if len({p.train_rows for p in ordered}) < 2:
        text = f"Cannot judge: only one training-set size ({largest:,} rows) was measured; a learning curve needs two."
        return AblationAnalysis(ordered, {}, largest, {}, threshold_points, None, text)
    rows = [p.train_rows for p in ordered]
    curves = {name: fit_learning_curve(rows, [p.accuracy(name) for p in ordered]) for name in TEST_SETS}
    gains = {name: 100 * curve.doubling_gain(largest) for name, curve in curves.items()}
    worthwhile, text = recommendation(gains, largest, threshold_points)
    fits = "; ".join(f"{TEST_SETS[name]}: {curve.reason}" for name, curve in curves.items())
    return AblationAnalysis(ordered, curves, largest, gains, threshold_points, worthwhile, f"{text} Fits: {fits}.")
