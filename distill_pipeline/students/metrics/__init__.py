"""Local ``evaluate`` metric modules for label classification, loadable with no network.

Each metric is a folder ``<name>/<name>.py`` holding one ``evaluate.Metric`` with the same
keyword arguments as the Hugging Face hub module of that name, so ``hub:<name>`` can replace it.
``evaluate.load`` copies a script into its module cache before importing it, so the scripts
cannot import each other by relative import; what they share lives here and they import it from
the installed package. Nothing here imports ``evaluate`` or ``datasets`` at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets
    import evaluate

METRICS_DIR = Path(__file__).parent
LOCAL_METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "roc_auc", "confusion_matrix")


def label_pair_features() -> datasets.Features:
    """One predicted and one reference label (an integer class id) per example."""
    import datasets

    return datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


def metric_info(
    description: str, inputs_description: str, features: datasets.Features | list[datasets.Features], reference: str
) -> evaluate.MetricInfo:
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=inputs_description,
        features=features,
        reference_urls=[reference],
    )


def json_ready(value: Any) -> float | list[Any]:
    """A scikit-learn result as a float, or (for per-class results) a nested list of numbers."""
    array = np.asarray(value)
    return float(array) if array.ndim == 0 else array.tolist()


AVERAGED_SCORE_ARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): gold labels.
    labels (list of int, optional): the labels to include and, with average=None, their order.
    pos_label (int, default 1): the positive class when average="binary".
    average (str or None, default "binary"): "binary" (the pos_label class only), "macro"
        (unweighted mean over classes), "micro", "weighted", or None (one score per class).
    sample_weight (list of float, optional): a weight per example.
    zero_division ("warn", 0 or 1, default "warn"): the value where the ratio is 0/0.
"""
