"""The statistics behind every decision: bootstrap intervals, McNemar's exact test, the paired bootstrap."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score

from distill_pipeline.students.statistics import (
    bootstrap_interval,
    compare_paired,
    mcnemar_exact,
    metric_value,
    paired_bootstrap,
)


def _noisy_copy(truth: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """Predictions that are right on about ``accuracy`` of the rows."""
    return np.where(rng.random(len(truth)) < accuracy, truth, 1 - truth)


@pytest.mark.parametrize(("only_first", "only_second"), [(0, 0), (3, 0), (10, 4), (7, 7), (25, 40), (1, 120)])
def test_mcnemar_exact_matches_the_two_sided_binomial_test(only_first: int, only_second: int) -> None:
    both, neither = 50, 9
    first = np.array([True] * only_first + [False] * only_second + [True] * both + [False] * neither)
    second = np.array([False] * only_first + [True] * only_second + [True] * both + [False] * neither)
    result = mcnemar_exact(first, second)
    assert (result.only_first, result.only_second) == (only_first, only_second)
    discordant = only_first + only_second
    expected = 1.0 if discordant == 0 else binomtest(only_first, discordant, 0.5).pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-9)


def test_mcnemar_known_value() -> None:
    # 10 against 2 discordant rows: 2 * P[X <= 2], X ~ Binomial(12, 1/2) = 2 * 79 / 4096.
    first = np.array([True] * 10 + [False] * 2)
    assert mcnemar_exact(first, ~first).p_value == pytest.approx(2 * 79 / 4096)


def test_the_interval_covers_the_true_accuracy_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(7)
    true_accuracy, rows, trials = 0.8, 300, 300
    covered = 0
    for trial in range(trials):
        truth = rng.integers(0, 2, rows)
        predicted = _noisy_copy(truth, true_accuracy, rng)
        interval = bootstrap_interval(truth, predicted, [0, 1], resamples=1000, seed=trial)
        covered += interval.contains(true_accuracy)
    assert 0.90 <= covered / trials <= 0.99


def test_the_interval_is_centred_on_the_measured_score_and_narrows_with_rows() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 4000)
    predicted = _noisy_copy(truth, 0.9, rng)
    small = bootstrap_interval(truth[:200], predicted[:200], [0, 1], "f1", 1)
    large = bootstrap_interval(truth, predicted, [0, 1], "f1", 1)
    assert large.estimate == pytest.approx(f1_score(truth, predicted, pos_label=1))
    assert small.low < small.estimate < small.high and large.low < large.estimate < large.high
    assert (large.high - large.low) < 0.5 * (small.high - small.low)
    # Seeded: the same call gives the same interval.
    assert bootstrap_interval(truth, predicted, [0, 1], "f1", 1) == large


def test_macro_f1_matches_scikit_learn_for_several_labels() -> None:
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, 500)
    predicted = np.where(rng.random(500) < 0.7, truth, rng.integers(0, 3, 500))
    expected = f1_score(truth, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    assert metric_value(truth, predicted, [0, 1, 2], "f1") == pytest.approx(expected)


def test_thousands_of_resamples_take_milliseconds_on_a_large_test_set() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 100_000)
    first, second = _noisy_copy(truth, 0.9, rng), _noisy_copy(truth, 0.89, rng)
    bootstrap_interval(truth[:10], first[:10], [0, 1])  # imports and first-call costs
    started = time.perf_counter()
    bootstrap_interval(truth, first, [0, 1], "f1", 1, resamples=4000)
    paired_bootstrap(truth, first, second, [0, 1], "f1", 1, resamples=4000)
    assert time.perf_counter() - started < 1.0


def test_a_paired_test_detects_a_real_difference() -> None:
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, 500)
    better, worse = _noisy_copy(truth, 0.92, rng), _noisy_copy(truth, 0.82, rng)
    for metric in ("accuracy", "f1"):
        comparison = compare_paired(truth, better, worse, [0, 1], metric, 1)
        assert comparison.verdict == "better" and comparison.p_value < 0.01
        assert comparison.difference.low > 0
        assert compare_paired(truth, worse, better, [0, 1], metric, 1).verdict == "worse"
    assert compare_paired(truth, better, worse, [0, 1]).test == "McNemar exact"


def test_a_paired_test_calls_a_difference_inside_the_noise_a_tie() -> None:
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, 300)
    first = _noisy_copy(truth, 0.9, rng)
    # The same accuracy, give or take a row, with its mistakes on other rows.
    second = _noisy_copy(truth, 0.9, rng)
    comparison = compare_paired(truth, first, second, [0, 1])
    assert comparison.verdict == "tied" and comparison.difference.contains(0.0)
    # Two rows better out of 300 is a win inside the noise.
    nudged = first.copy()
    wrong = np.flatnonzero(nudged != truth)[:2]
    nudged[wrong] = truth[wrong]
    edge = compare_paired(truth, nudged, first, [0, 1])
    assert edge.first > edge.second and edge.verdict == "tied" and edge.p_value == pytest.approx(0.5)
    identical = compare_paired(truth, first, first, [0, 1], "f1", 1)
    assert identical.p_value == 1.0 and identical.verdict == "tied" and identical.difference.estimate == 0.0


@pytest.mark.parametrize(
    ("reference", "predicted", "message"),
    [
        ([0, 1, 2], [0, 1, 1], "reference labels \\[2\\]"),
        ([0, 1], [0, 1, 1], "2 reference labels but 3"),
        ([], [], "no rows"),
    ],
)
def test_malformed_inputs_are_refused(reference, predicted, message) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(reference, predicted, [0, 1])


def test_a_paired_comparison_needs_the_same_rows() -> None:
    with pytest.raises(ValueError, match="same rows"):
        compare_paired([0, 1, 1], [0, 1, 1], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="same rows"):
        mcnemar_exact([True, False], [True])
    with pytest.raises(ValueError, match="alpha"):
        compare_paired([0, 1], [0, 1], [0, 1], [0, 1], alpha=1.5)
