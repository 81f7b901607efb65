"""ROC AUC from scores: binary, or one-vs-rest over the classes of a multi-class task."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import roc_auc_score

from distill_pipeline.students.metrics import json_ready, metric_info

_DESCRIPTION = (
    "The area under the ROC curve: the probability that a random positive example scores above a "
    "random negative one. Multi-class scores are judged one class against the rest."
)
_KWARGS_DESCRIPTION = """
Args:
    references (list of int): gold labels.
    prediction_scores (list of float, or list of list of float): for a binary task, one score per
        example for the positive class; for a multi-class task, one probability per class per
        example (rows sum to 1), columns in the order of `labels` (or of the sorted labels).
    pos_label (int, optional): binary only: the positive label; without it the larger label is.
    labels (list of int, optional): multi-class only: the label of each score column.
    average (str or None, default "macro"): how per-class AUCs combine (multi-class).
    multi_class (str, default "ovr"): "ovr" (one-vs-rest) or "ovo" (one-vs-one).
    sample_weight (list of float, optional): a weight per example.
    max_fpr (float, optional): binary only: the standardised partial AUC up to this FPR.
Returns:
    roc_auc (float): in [0, 1]; 0.5 is chance. Undefined (an error) when the references hold a
        single class.
"""


class RocAuc(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        # Two input shapes; evaluate takes the first that the first example fits.
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            [
                datasets.Features(
                    {"prediction_scores": datasets.Value("float64"), "references": datasets.Value("int64")}
                ),
                datasets.Features(
                    {
                        "prediction_scores": datasets.Sequence(datasets.Value("float64")),
                        "references": datasets.Value("int64"),
                    }
                ),
            ],
            "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html",
        )

    def _compute(
        self,
        references,
        prediction_scores,
        pos_label=None,
        labels=None,
        average="macro",
        multi_class="ovr",
        sample_weight=None,
        max_fpr=None,
    ):
        scores = np.asarray(prediction_scores, dtype=float)
        gold = np.asarray(references)
        if scores.ndim == 1:
            if pos_label is not None:
                gold = (gold == pos_label).astype(int)
            score = roc_auc_score(gold, scores, sample_weight=sample_weight, max_fpr=max_fpr)
        else:
            score = roc_auc_score(
                gold, scores, average=average, multi_class=multi_class, labels=labels, sample_weight=sample_weight
            )
        return {"roc_auc": json_ready(score)}
