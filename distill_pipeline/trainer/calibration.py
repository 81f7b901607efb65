"""The decision rule of a two-label student: a threshold chosen on its validation rows, and the
adjustment of its probabilities when the traffic's share of positives is not the training set's.

A student's probabilities are fitted to the teacher's labels, but its best cut-off is rarely
0.5: a small training set, a skewed label rate or the early end of a short run all move it. The
threshold on P(positive) that maximises validation accuracy is recorded beside the adapter and
used by every prediction; the probabilities themselves are left untouched, so ROC-AUC and any
later re-calibration see the model's own scores.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

DEFAULT_THRESHOLD = 0.5
# Below this many validation rows, or without both labels among them, a chosen threshold is
# noise fitted to a handful of rows: keep 0.5.
MIN_CALIBRATION_ROWS = 50
MIN_ROWS_PER_LABEL = 5
# A cut-off near 0 or 1 turns the student into a constant answer on new data.
THRESHOLD_RANGE = (0.05, 0.95)


def choose_threshold(p_positive: Sequence[float], is_positive: Sequence[bool]) -> float:
    """The threshold t (predict positive when p >= t) with the best accuracy on these rows.

    Candidates are the midpoints between consecutive distinct scores, so the chosen t sits in
    the middle of its gap rather than on a validation row's score. Among equally accurate
    thresholds the one nearest 0.5 wins: the data gives no reason to move further.
    """
    if len(p_positive) != len(is_positive):
        raise ValueError(f"{len(p_positive)} scores for {len(is_positive)} labels")
    positives = sum(bool(y) for y in is_positive)
    if len(p_positive) < MIN_CALIBRATION_ROWS or min(positives, len(is_positive) - positives) < MIN_ROWS_PER_LABEL:
        return DEFAULT_THRESHOLD
    low, high = THRESHOLD_RANGE
    pairs = sorted(zip((float(p) for p in p_positive), (bool(y) for y in is_positive), strict=True))
    scores = [p for p, _ in pairs]
    candidates = {DEFAULT_THRESHOLD}
    candidates.update((a + b) / 2 for a, b in itertools.pairwise(scores) if a != b)
    candidates = {t for t in candidates if low <= t <= high}
    # Sweep upwards: rows below t are predicted negative. Correct = negatives below + positives at/above.
    best_key, best = None, DEFAULT_THRESHOLD
    negatives_below = positives_below = 0
    index = 0
    for threshold in sorted(candidates):
        while index < len(pairs) and pairs[index][0] < threshold:
            if pairs[index][1]:
                positives_below += 1
            else:
                negatives_below += 1
            index += 1
        correct = negatives_below + (positives - positives_below)
        key = (correct, -abs(threshold - DEFAULT_THRESHOLD))
        if best_key is None or key > best_key:
            best_key, best = key, threshold
    return best


def apply_threshold(p_positive: float, threshold: float) -> bool:
    """Whether a row with this P(positive) is labelled positive."""
    return p_positive >= threshold


# --- label shift -------------------------------------------------------------------------------
# A student's P(positive) is fitted at its training set's share of positives. Where traffic has
# another share (label shift: the same texts per label, other label frequencies), Bayes' rule
# moves every posterior by the ratio of the two priors' odds (Saerens, Latinne & Decaestecker,
# "Adjusting the outputs of a classifier to new a priori probabilities", Neural Computation 2002).
# The traffic's share is configured, or estimated from the student's own probabilities on the
# unlabelled texts by the same paper's EM.

#: Fewer texts than this estimate their share of positives too loosely to move any decision.
MIN_PRIOR_ESTIMATE_ROWS = 100
# Priors are kept off 0 and 1, where the odds ratio is undefined.
_PRIOR_FLOOR = 1e-4


def _clipped(prior: float) -> float:
    return min(max(float(prior), _PRIOR_FLOOR), 1.0 - _PRIOR_FLOOR)


def shift_probability(p_positive: float, train_prior: float, prior: float) -> float:
    """P(positive) of a text under the class prior ``prior``, from the student's under ``train_prior``."""
    train_prior, prior = _clipped(train_prior), _clipped(prior)
    ratio = (prior / (1.0 - prior)) / (train_prior / (1.0 - train_prior))
    odds = p_positive * ratio
    return odds / (odds + (1.0 - p_positive))


def estimate_prior(p_positive: Sequence[float], train_prior: float, *, iterations: int = 200) -> float:
    """The share of positives among these unlabelled texts, by EM on the student's probabilities.

    Each step re-weights every posterior to the current estimate and takes their mean as the
    next one; it converges to the maximum-likelihood prior for well-calibrated probabilities.
    """
    if not p_positive:
        raise ValueError("no probabilities to estimate a prior from")
    estimate = _clipped(train_prior)
    for _ in range(iterations):
        shifted = [shift_probability(p, train_prior, estimate) for p in p_positive]
        updated = _clipped(sum(shifted) / len(shifted))
        if abs(updated - estimate) < 1e-7:
            return updated
        estimate = updated
    return estimate
