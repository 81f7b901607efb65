"""Precision: TP / (TP + FP): of the examples predicted as a class, the share that are."""

import evaluate
from sklearn.metrics import precision_score

from distill_pipeline.metrics import AVERAGED_SCORE_ARGS, json_ready, label_pair_features, metric_info

_DESCRIPTION = "Precision is TP / (TP + FP): of the examples predicted as a class, the share that are."
_KWARGS_DESCRIPTION = (
    AVERAGED_SCORE_ARGS
    + """Returns:
    precision (float, or list of float with average=None): in [0, 1].
"""
)


class Precision(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            label_pair_features(),
            "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.precision_score.html",
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
        zero_division="warn",
    ):
        score = precision_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        return {"precision": json_ready(score)}
