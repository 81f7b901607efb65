"""Scoring at traffic's share of positives: the deployment prior and prior-reweighted accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from distill_pipeline.students.traffic import accuracy_at_prior, deployment_prior


def test_the_configured_prior_wins_else_recent_teacher_labels():
    assert deployment_prior(0.09, [1] * 500, positive=1).share == 0.09
    recent = [1] * 30 + [0] * 270
    prior = deployment_prior(None, recent, positive=1)
    assert (prior.share, prior.rows) == (pytest.approx(0.1), 300)
    assert "logged traffic" in prior.describe()
    assert deployment_prior(None, recent[:99], positive=1) is None  # too few to say anything
    assert deployment_prior(None, [0] * 200, positive=1) is None  # a constant is no prior
    assert deployment_prior(None, None, positive=1) is None
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        deployment_prior(1.0, None, positive=1)


def test_reweighting_matches_a_test_set_actually_drawn_at_that_prior():
    rng = np.random.default_rng(3)
    # A model that finds 80% of positives and 95% of negatives, on a balanced test set.
    truth = np.array([1] * 2000 + [0] * 2000)
    predicted = np.where(truth == 1, rng.random(4000) < 0.8, rng.random(4000) >= 0.95).astype(int)
    at_9 = accuracy_at_prior(truth, predicted, positive=1, prior=0.09)
    # The same model on a set that has 9% positives: keep every negative, 9% worth of positives.
    kept_positives = np.flatnonzero(truth == 1)[: round(2000 * 0.09 / 0.91)]
    natural = np.concatenate([kept_positives, np.flatnonzero(truth == 0)])
    drawn = float(np.mean(predicted[natural] == truth[natural]))
    assert at_9.contains(drawn)
    assert at_9.estimate == pytest.approx(0.09 * 0.8 + 0.91 * 0.95, abs=0.015)
    # At the balanced set's own prior it is the plain accuracy.
    assert accuracy_at_prior(truth, predicted, 1, 0.5).estimate == pytest.approx(np.mean(predicted == truth))
    assert at_9.low < at_9.estimate < at_9.high and at_9.high - at_9.low < 0.03


def test_reweighting_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="both classes"):
        accuracy_at_prior([1, 1], [1, 0], 1, 0.1)
    with pytest.raises(ValueError, match="strictly between"):
        accuracy_at_prior([1, 0], [1, 0], 1, 0.0)
    with pytest.raises(ValueError, match="predictions"):
        accuracy_at_prior([1, 0], [1], 1, 0.2)
