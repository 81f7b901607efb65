"""Confusion matrix: counts of (gold label, predicted label) pairs; rows gold, columns predicted."""

import evaluate
from sklearn.metrics import confusion_matrix

from distill_pipeline.students.metrics import json_ready, label_pair_features, metric_info

_DESCRIPTION = (
    "The confusion matrix C, where C[i][j] counts the examples whose gold label is the i-th label "
    "and whose predicted label is the j-th."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): gold labels.
    labels (list of int, optional): the row and column order (default: the sorted labels seen).
    sample_weight (list of float, optional): a weight per example.
    normalize ("true", "pred", "all" or None, default None): divide by row, column or grand totals.
Returns:
    confusion_matrix (list of list): counts (or shares when normalised).
"""


class ConfusionMatrix(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            label_pair_features(),
            "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.confusion_matrix.html",
        )

    def _compute(self, predictions, references, labels=None, sample_weight=None, normalize=None):
        matrix = confusion_matrix(
            references, predictions, labels=labels, sample_weight=sample_weight, normalize=normalize
        )
        return {"confusion_matrix": json_ready(matrix)}
