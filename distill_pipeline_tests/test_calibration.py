"""The decision threshold of two-label students: chosen on validation rows, applied to every prediction."""

from __future__ import annotations

import random

import pytest
import torch

from distill_pipeline.trainer.calibration import DEFAULT_THRESHOLD, THRESHOLD_RANGE, choose_threshold
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
