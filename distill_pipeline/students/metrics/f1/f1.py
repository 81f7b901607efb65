"""F1: the harmonic mean of precision and recall, 2 * P * R / (P + R)."""

import evaluate
from sklearn.metrics import f1_score

from distill_pipeline.students.metrics import AVERAGED_SCORE_ARGS, json_ready, label_pair_features, metric_info

_DESCRIPTION = "F1 is the harmonic mean of precision and recall, 2 * P * R / (P + R)."
_KWARGS_DESCRIPTION = (
    AVERAGED_SCORE_ARGS
    + """Returns:
    f1 (float, or list of float with average=None): in [0, 1].
"""
)


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            label_pair_features(),
            "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html",
        )

    def _compute(self, predictions, references, **options):
        # The options are f1_score's own (labels, pos_label, average, sample_weight, zero_division),
        # with its defaults, which are the hub module's; a misspelt one is refused by scikit-learn.
        return {"f1": json_ready(f1_score(references, predictions, **options))}
