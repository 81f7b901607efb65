"""Shares of calls with their 95% intervals, and the test of two shares against each other.

Live agreement, label rates and feedback rates are all counts of yes among n calls. The Wilson
score interval keeps its coverage near 95% where the normal approximation fails (a rate near 0
or 1, a few dozen calls), which is where monitoring lives: thumbs-down rates of a few percent, and
agreement in the nineties.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Proportion:
    """``hits`` of ``n`` with its Wilson interval; an empty sample is [0, 1], knowing nothing."""

    hits: int
    n: int
    low: float
    high: float
    confidence: float = CONFIDENCE

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else 0.0

    def text(self) -> str:
        if not self.n:
            return "n/a (no calls)"
        return f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}] (n = {self.n:,})"

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "rate": self.rate}


def wilson(hits: int, n: int, confidence: float = CONFIDENCE) -> Proportion:
    """The Wilson score interval of ``hits`` successes in ``n`` trials (scipy's, not a hand formula)."""
    from scipy.stats import binomtest

    if n < 0 or not 0 <= hits <= max(n, 0):
        raise ValueError(f"{hits} hits of {n} calls is not a proportion")
    if n == 0:
        return Proportion(0, 0, 0.0, 1.0, confidence)
    interval = binomtest(int(hits), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Proportion(int(hits), int(n), float(interval.low), float(interval.high), confidence)


@dataclass(frozen=True)
class TwoProportionTest:
    """``a`` against ``b``: the difference of rates, its Newcombe interval and the pooled z-test's p-value."""

    a: Proportion
    b: Proportion
    difference: float
    low: float
    high: float
    z: float
    p_value: float

    def significant(self, alpha: float = 1 - CONFIDENCE) -> bool:
        return self.p_value < alpha

    def to_dict(self) -> dict[str, object]:
        return {
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "difference": self.difference,
            "low": self.low,
            "high": self.high,
            "z": self.z,
            "p_value": self.p_value,
        }


def two_proportion_test(a: Proportion, b: Proportion) -> TwoProportionTest:
    """Whether ``a``'s rate differs from ``b``'s (two-sided), with a 95% interval of ``a - b``.

    The interval is Newcombe's hybrid score interval (his method 10), built from the two Wilson
    intervals, so it stays inside [-1, 1] and behaves at rates near 0. Either side empty: no test.
    """
    from scipy.stats import norm

    difference = a.rate - b.rate
    if not a.n or not b.n:
        return TwoProportionTest(a, b, difference, -1.0, 1.0, 0.0, 1.0)
    low = difference - math.sqrt((a.rate - a.low) ** 2 + (b.high - b.rate) ** 2)
    high = difference + math.sqrt((a.high - a.rate) ** 2 + (b.rate - b.low) ** 2)
    pooled = (a.hits + b.hits) / (a.n + b.n)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / a.n + 1 / b.n))
    if spread == 0.0:
        return TwoProportionTest(a, b, difference, low, high, 0.0, 1.0)
    z = difference / spread
    return TwoProportionTest(a, b, difference, low, high, z, float(2 * norm.sf(abs(z))))
