"""Recall: TP / (TP + FN): of the examples of a class, the share predicted as it."""

import evaluate
from sklearn.metrics import recall_score

from distill_pipeline.students.metrics import AVERAGED_SCORE_ARGS, json_ready, label_pair_features, metric_info

_DESCRIPTION = "Recall is TP / (TP + FN): of the examples of a class, the share predicted as it."
_KWARGS_DESCRIPTION = (
    AVERAGED_SCORE_ARGS
    + """Returns:
    recall (float, or list of float with average=None): in [0, 1].
"""
)


class Recall(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            label_pair_features(),
            "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.recall_score.html",
        )

    def _compute(self, predictions, references, **options):
        # The options are recall_score's own (labels, pos_label, average, sample_weight, zero_division),
        # with its defaults, which are the hub module's; a misspelt one is refused by scikit-learn.
        return {"recall": json_ready(recall_score(references, predictions, **options))}
