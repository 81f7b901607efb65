"""The intervals behind every decision: the cell-count bootstrap against scipy's row bootstrap.

``distill_pipeline.students.statistics`` draws each resample's confusion-cell counts from a
multinomial instead of row indices. The baseline is ``scipy.stats.bootstrap`` (vectorised,
percentile method, paired for the difference of two models), the stock way to get the same
intervals. Both run here on the same synthetic predictions, at several test-set sizes, with the
same number of resamples; the table gives each one's time, the ratio, and both intervals (they
estimate the same distribution, so they agree to the Monte Carlo error).

    python bench/bench_statistics.py [--resamples 4000] [--rows 500 5000 50000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy
from scipy import stats

from distill_pipeline.students.statistics import bootstrap_interval, metric_value, paired_bootstrap


def _best_of(repeats: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=4000)
    parser.add_argument("--rows", type=int, nargs="+", default=[500, 5000, 50000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}; {args.resamples} resamples, best of {args.repeats}\n"
    )
    print(
        "| statistic | rows | scipy.stats.bootstrap s | cell bootstrap s | speed-up | scipy interval | cell interval |"
    )
    print("|---|---:|---:|---:|---:|---|---|")
    rng = np.random.default_rng(0)
    for rows in args.rows:
        truth = rng.integers(0, 2, rows)
        first = np.where(rng.random(rows) < 0.9, truth, 1 - truth)
        second = np.where(rng.random(rows) < 0.88, truth, 1 - truth)
        for line in _rows(truth, first, second, args.resamples, args.repeats):
            print(line, flush=True)
    assert abs(metric_value(truth, first, [0, 1], "f1", 1) - _f1(truth, first)) < 1e-12


def _f1(t: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    tp = np.sum((t == 1) & (p == 1), axis=axis)
    return 2 * tp / (np.sum(t == 1, axis=axis) + np.sum(p == 1, axis=axis))


def _rows(truth: np.ndarray, first: np.ndarray, second: np.ndarray, resamples: int, repeats: int) -> list[str]:
    """One table row per statistic: both timings, the ratio and both intervals."""

    def scipy_bootstrap(data: tuple, statistic, **kwargs):
        return stats.bootstrap(
            data, statistic, n_resamples=resamples, method="percentile", vectorized=True, random_state=1, **kwargs
        ).confidence_interval

    cases = {
        "accuracy": (
            lambda: scipy_bootstrap(((first == truth).astype(float),), np.mean),
            lambda: bootstrap_interval(truth, first, [0, 1], "accuracy", 1, resamples=resamples),
        ),
        "F1": (
            lambda: scipy_bootstrap((truth, first), _f1, paired=True),
            lambda: bootstrap_interval(truth, first, [0, 1], "f1", 1, resamples=resamples),
        ),
        "F1 difference, paired": (
            lambda: scipy_bootstrap(
                (truth, first, second), lambda t, a, b, axis=-1: _f1(t, a, axis) - _f1(t, b, axis), paired=True
            ),
            lambda: paired_bootstrap(truth, first, second, [0, 1], "f1", 1, resamples=resamples)[0],
        ),
    }
    lines = []
    for name, (baseline, ours) in cases.items():
        base_s, base_ci = _best_of(repeats, baseline)
        ours_s, ours_ci = _best_of(repeats, ours)
        lines.append(
            f"| {name} | {len(truth):,} | {base_s:.4f} | {ours_s:.4f} | {base_s / ours_s:,.0f}x | "
            f"[{base_ci.low:.4f}, {base_ci.high:.4f}] | [{ours_ci.low:.4f}, {ours_ci.high:.4f}] |"
        )
    return lines


if __name__ == "__main__":
    main()
