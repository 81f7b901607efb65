"""Scoring at the rate traffic has: test sets reweighted to the deployment's share of positives.

A frozen test set has the share of positives of the pool it was drawn from (the logged comments,
or 50/50 for the balanced set); live traffic has its own, and it moves. Under label shift the
texts of each class look the same whatever their share (Saerens et al. 2002), so each class's
recall measured on the test set holds at any prior, and the accuracy traffic would see at a
share ``p`` of positives is ``p * recall(positive) + (1 - p) * recall(negative)``: the test set
reweighted so that its positives weigh ``p``. The model being scored decides at that prior too
(``predict --prior p``): both halves of "how would this model do on traffic" move together.

The deployment's prior is configured (``[monitoring] deployment_prior``), else the teacher's
label rate in the logged traffic the in-distribution test set was drawn from (its own labels):
the traffic the pipeline last froze. The drift report follows the share day by day; when it moves,
setting ``deployment_prior`` scores every later evaluation at the new share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distill_pipeline.students.statistics import CONFIDENCE, RESAMPLES, SEED, Interval

#: Where a deployment prior came from: the task file, or the teacher's labels on logged traffic.
PRIOR_SOURCES = ("the task's [monitoring] deployment_prior", "the teacher's labels of the logged traffic")


@dataclass(frozen=True)
class DeploymentPrior:
    """The share of positives traffic is expected to have, and how it is known."""

    share: float
    source: str
    rows: int | None = None

    def describe(self) -> str:
        counted = f" ({self.rows:,} labelled rows)" if self.rows is not None else ""
        return f"{self.share:.1%} positives, from {self.source}{counted}"


def deployment_prior(
    configured: float | None, logged_labels: Sequence[int] | None, positive: int, *, min_rows: int = 100
) -> DeploymentPrior | None:
    """The configured prior, else the share of ``positive`` among the teacher's labels of logged
    traffic (None with fewer than ``min_rows`` of them, or all of one label)."""
    if configured is not None:
        if not 0.0 < configured < 1.0:
            raise ValueError(f"a deployment prior is a share strictly between 0 and 1, not {configured}")
        return DeploymentPrior(float(configured), PRIOR_SOURCES[0])
    if logged_labels is None or len(logged_labels) < min_rows:
        return None
    labels = np.asarray(logged_labels)
    share = float(np.mean(labels == positive))
    if share in (0.0, 1.0):
        return None
    return DeploymentPrior(share, PRIOR_SOURCES[1], len(labels))


def accuracy_at_prior(
    reference: Sequence[int] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    positive: int,
    prior: float,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Accuracy on the rows reweighted so that positives weigh ``prior``, with a bootstrap interval.

    The bootstrap resamples rows within each class (a stratified bootstrap): the weights fix each
    class's share, so only the recalls vary.
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be strictly between 0 and 1, not {prior}")
    truth, guess = np.asarray(reference), np.asarray(predicted)
    if truth.shape != guess.shape:
        raise ValueError(f"{truth.size} reference labels but {guess.size} predictions")
    is_positive = truth == positive
    n_positive, n_negative = int(is_positive.sum()), int((~is_positive).sum())
    if n_positive == 0 or n_negative == 0:
        raise ValueError("reweighting to a prior needs rows of both classes")
    hits_positive = int(np.sum(guess[is_positive] == positive))
    hits_negative = int(np.sum(guess[~is_positive] != positive))
    estimate = prior * hits_positive / n_positive + (1 - prior) * hits_negative / n_negative
    rng = np.random.default_rng(seed)
    # Resampling n rows of a class with replacement draws its hits from Binomial(n, recall).
    recall_positive = rng.binomial(n_positive, hits_positive / n_positive, resamples) / n_positive
    recall_negative = rng.binomial(n_negative, hits_negative / n_negative, resamples) / n_negative
    draws = prior * recall_positive + (1 - prior) * recall_negative
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(float(estimate), float(low), float(high), confidence)
