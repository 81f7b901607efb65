"""Precision: TP / (TP + FP): of the examples predicted as a class, the share that are."""

import evaluate
from sklearn.metrics import precision_score

from distill_pipeline.students.metrics import AVERAGED_SCORE_ARGS, json_ready, label_pair_features, metric_info

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

    def _compute(self, predictions, references, **options):
        # The options are precision_score's own (labels, pos_label, average, sample_weight, zero_division),
        # with its defaults, which are the hub module's; a misspelt one is refused by scikit-learn.
        return {"precision": json_ready(precision_score(references, predictions, **options))}
