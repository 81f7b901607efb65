"""Accuracy: the share of predictions that equal their reference label."""

import evaluate
from sklearn.metrics import accuracy_score

from distill_pipeline.students.metrics import json_ready, label_pair_features, metric_info

_DESCRIPTION = "Accuracy is the proportion of correct predictions among all predictions."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): gold labels.
    normalize (bool, default True): the share correct if True, else the count correct.
    sample_weight (list of float, optional): a weight per example.
Returns:
    accuracy (float): in [0, 1] when normalize is True.
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            label_pair_features(),
            "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html",
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": json_ready(score)}
