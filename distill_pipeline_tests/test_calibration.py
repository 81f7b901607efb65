"""The decision threshold of two-label students: chosen on validation rows, applied to every prediction."""

from __future__ import annotations

import math
import random

import pytest
import torch

from distill_pipeline.trainer.calibration import (
    DEFAULT_THRESHOLD,
    THRESHOLD_RANGE,
    choose_threshold,
    estimate_prior,
    shift_probability,
)
from distill_pipeline.trainer.data import LabelSet
from distill_pipeline.trainer.predict import DecisionRule, decide


def accuracy(scores: list[float], truth: list[bool], threshold: float) -> float:
    return sum((p >= threshold) == y for p, y in zip(scores, truth, strict=True)) / len(truth)


def test_the_threshold_moves_to_where_the_classes_separate() -> None:
    rng = random.Random(3)
    # An under-confident student: positives score around 0.3, negatives around 0.1.
    truth = [rng.random() < 0.3 for _ in range(400)]
    scores = [min(1.0, max(0.0, (0.3 if y else 0.1) + rng.gauss(0, 0.05))) for y in truth]
    threshold = choose_threshold(scores, truth)
    assert 0.15 < threshold < 0.25
    assert accuracy(scores, truth, threshold) > accuracy(scores, truth, DEFAULT_THRESHOLD) + 0.2
    # No other candidate does better on these rows.
    grid = [i / 1000 for i in range(50, 951)]
    assert accuracy(scores, truth, threshold) >= max(accuracy(scores, truth, t) for t in grid)


def test_a_well_calibrated_student_keeps_one_half_and_ties_go_to_one_half() -> None:
    # Perfectly separated at every cut between 0.2 and 0.8: no reason to leave 0.5.
    truth = [False] * 30 + [True] * 30
    scores = [0.2] * 30 + [0.8] * 30
    assert choose_threshold(scores, truth) == pytest.approx(0.5)


def test_too_few_rows_or_one_label_keep_the_default() -> None:
    assert choose_threshold([0.1, 0.2, 0.9], [False, False, True]) == DEFAULT_THRESHOLD
    assert choose_threshold([0.3] * 100, [True] * 100) == DEFAULT_THRESHOLD
    with pytest.raises(ValueError, match="scores for"):
        choose_threshold([0.1, 0.2], [True])


def test_the_threshold_stays_inside_its_range_however_skewed_the_scores() -> None:
    truth = [True] * 10 + [False] * 90
    scores = [0.001 + i * 1e-5 for i in range(100)]  # every score tiny, positives the lowest
    low, high = THRESHOLD_RANGE
    assert low <= choose_threshold(scores, truth) <= high


def test_decide_applies_the_threshold_to_the_positive_label_only() -> None:
    labels = LabelSet([0, 1], ["ok", "toxic"])
    probabilities = torch.tensor([[0.75, 0.25], [0.9, 0.1], [0.4, 0.6]])
    assert decide(labels, probabilities, None) == [0, 0, 1]
    assert decide(labels, probabilities, DecisionRule(1, 0.2)) == [1, 0, 1]
    # The positive label may come first in the label set.
    flipped = LabelSet([1, 0], ["toxic", "ok"])
    assert decide(flipped, probabilities.flip(1), DecisionRule(1, 0.2)) == [1, 0, 1]


def test_shifting_to_the_training_prior_changes_nothing_and_a_rarer_label_lowers_every_probability() -> None:
    for p in (0.01, 0.3, 0.5, 0.9):
        assert shift_probability(p, 0.2, 0.2) == pytest.approx(p)
        assert shift_probability(p, 0.2, 0.05) < p < shift_probability(p, 0.2, 0.5)
    # Bayes' rule by hand: odds 1 at a 20% prior become odds 1 * (0.5/0.5)/(0.2/0.8) = 4 at 50%.
    assert shift_probability(0.5, 0.2, 0.5) == pytest.approx(0.8)


def _calibrated_posteriors(
    rng: random.Random, n: int, true_prior: float, train_prior: float
) -> tuple[list[float], list[bool]]:
    """Texts drawn at ``true_prior`` from two Gaussian scores, as Bayes posteriors at ``train_prior``, and their truth."""
    posteriors, truth = [], []
    for _ in range(n):
        positive = rng.random() < true_prior
        x = rng.gauss(1.0 if positive else -1.0, 1.0)
        odds = math.exp(2.0 * x) * train_prior / (1.0 - train_prior)  # N(1, 1) over N(-1, 1), times the prior odds
        posteriors.append(odds / (1.0 + odds))
        truth.append(positive)
    return posteriors, truth


@pytest.mark.parametrize("true_prior", [0.09, 0.21, 0.5])
def test_em_recovers_the_share_of_positives_among_unlabelled_texts(true_prior: float) -> None:
    posteriors, truth = _calibrated_posteriors(random.Random(7), 4000, true_prior, train_prior=0.21)
    assert estimate_prior(posteriors, 0.21) == pytest.approx(sum(truth) / len(truth), abs=0.02)


def test_deciding_at_the_estimated_prior_is_more_accurate_under_label_shift() -> None:
    posteriors, truth = _calibrated_posteriors(random.Random(11), 4000, 0.09, train_prior=0.21)
    estimated = estimate_prior(posteriors, 0.21)
    shifted = [shift_probability(p, 0.21, estimated) for p in posteriors]
    # Bayes' rule at the right prior: about one point here, on 4,000 seeded rows.
    assert accuracy(shifted, truth, 0.5) > accuracy(posteriors, truth, 0.5) + 0.005
