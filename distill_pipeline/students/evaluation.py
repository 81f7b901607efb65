"""Evaluation of a classifier against a test set: metrics, baselines, agreement, mistakes, speed.

Metrics go through the project's local ``evaluate`` modules (``distill_pipeline/students/metrics/``), so
they need no network; ``hub:<name>`` names a hub module instead where a hub is reachable. A
predictor is any callable from texts to :class:`Predictions` (labels, and class probabilities in
the task's label order); the two baselines here are predictors, and so must be the student.
Heavy libraries (``evaluate``, scikit-learn) are imported where they are used.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.students.metrics import LOCAL_METRICS, METRICS_DIR

HUB_PREFIX = "hub:"
# Columns of the comparison table, in this order; a column no model has is left out.
COMPARISON_COLUMNS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "roc_auc", "agreement", "cohen_kappa")
MISSING_CELL = "–"


@functools.cache
def load_metric(name: str) -> Any:
    """An ``evaluate`` metric: a local module by name, or ``hub:<id>`` passed through to ``evaluate.load``.

    Results are kept in memory rather than in evaluate's on-disk cache, which needs file locks.
    Each module is loaded once per process: ``evaluate.load`` copies and imports the script
    again on every call, which cost more than the metrics themselves. A loaded metric keeps no
    state between ``compute`` calls, so one instance serves every evaluation.
    """
    import evaluate

    if name.startswith(HUB_PREFIX):
        return evaluate.load(name[len(HUB_PREFIX) :], keep_in_memory=True)
    if name not in LOCAL_METRICS:
        raise ValueError(f"no local metric {name!r}; local: {', '.join(LOCAL_METRICS)} (or hub:<id> for a hub metric)")
    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


# --- predictions and metrics ---------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """Predicted labels and class probabilities; probability columns follow ``label_values``."""

    labels: list[int]
    probabilities: np.ndarray
    label_values: tuple[int, ...]

    def scores(self, positive: int | None) -> np.ndarray:
        """Scores as :func:`evaluate_predictions` takes them: for a two-label task, the probability
        of ``positive`` (or of the last label when there is none); otherwise the whole matrix."""
        if len(self.label_values) == 2:
            return self.probabilities[:, self.label_values.index(_scored_label(self.label_values, positive))]
        return self.probabilities


Predictor = Callable[[Sequence[str]], Predictions]


def _scored_label(label_values: Sequence[int], positive: int | None) -> int:
    return positive if positive is not None else label_values[-1]


def _checked_labels(values: Sequence[int], what: str, label_values: Sequence[int]) -> list[int]:
    labels = [int(v) for v in values]
    unknown = sorted(set(labels) - set(label_values))
    if unknown:
        raise ValueError(f"{what} labels {unknown} are not among the task's labels {list(label_values)}")
    return labels


def _binary_scores(scores: Any, label_values: Sequence[int], positive: int | None) -> np.ndarray:
    """One score per example for the scored label of a two-label task, from a vector or a matrix."""
    array = np.asarray(scores, dtype=float)
    if array.ndim == 2 and array.shape[1] == len(label_values):
        return array[:, list(label_values).index(_scored_label(label_values, positive))]
    if array.ndim != 1:
        raise ValueError(f"binary scores must be one per example or one column per label, not shape {array.shape}")
    return array


def evaluate_predictions(
    gold: Sequence[int],
    predicted: Sequence[int],
    scores: Any | None,
    label_values: Sequence[int],
    positive: int | None,
    *,
    label_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, ROC AUC and the confusion matrix of predictions against gold.

    Precision, recall and F1 are of the ``positive`` label for a two-label task that has one, and
    macro averages over the labels otherwise. ``scores`` is either one score per example (two
    labels: the probability of ``positive``, or of the last label when there is none) or one
    probability per label per example, columns in ``label_values`` order (rows summing to 1 for a
    multi-class task). ROC AUC is ``None``, with a ``roc_auc_note``, when there are no scores or
    the gold labels lack a class.
    """
    label_values = [int(v) for v in label_values]
    gold_labels = _checked_labels(gold, "gold", label_values)
    predicted_labels = _checked_labels(predicted, "predicted", label_values)
    if len(gold_labels) != len(predicted_labels):
        raise ValueError(f"{len(gold_labels)} gold labels but {len(predicted_labels)} predictions")
    if not gold_labels:
        raise ValueError("nothing to evaluate: no rows")
    binary = len(label_values) == 2 and positive is not None
    averaging: dict[str, Any] = {"average": "binary", "pos_label": positive} if binary else {"average": "macro"}
    pair = {"predictions": predicted_labels, "references": gold_labels}

    result: dict[str, Any] = {
        "rows": len(gold_labels),
        "average": averaging["average"],
        "positive": positive if binary else None,
        "accuracy": load_metric("accuracy").compute(**pair)["accuracy"],
    }
    for name in ("precision", "recall", "f1"):
        result[name] = load_metric(name).compute(**pair, labels=label_values, zero_division=0, **averaging)[name]
    result["roc_auc"], note = _roc_auc(gold_labels, scores, label_values, positive)
    if note:
        result["roc_auc_note"] = note
    matrix = load_metric("confusion_matrix").compute(**pair, labels=label_values)["confusion_matrix"]
    result["confusion_matrix"] = matrix
    result["confusion_matrix_labels"] = label_values
    result["confusion_matrix_markdown"] = confusion_matrix_markdown(matrix, label_values, label_names)
    return result


def _roc_auc(
    gold: list[int], scores: Any | None, label_values: list[int], positive: int | None
) -> tuple[float | None, str | None]:
    if scores is None:
        return None, "no scores given"
    absent = sorted(set(label_values) - set(gold))
    if absent:
        return None, f"undefined: the gold labels have no example of {absent}"
    if len(label_values) == 2:
        vector = _binary_scores(scores, label_values, positive)
        if len(vector) != len(gold):
            raise ValueError(f"{len(gold)} gold labels but {len(vector)} scores")
        kwargs: dict[str, Any] = {
            "prediction_scores": vector.tolist(),
            "pos_label": _scored_label(label_values, positive),
        }
    else:
        matrix = np.asarray(scores, dtype=float)
        if matrix.shape != (len(gold), len(label_values)):
            raise ValueError(f"multi-class scores must have shape {(len(gold), len(label_values))}, not {matrix.shape}")
        kwargs = {"prediction_scores": matrix.tolist(), "labels": label_values, "multi_class": "ovr"}
    return load_metric("roc_auc").compute(references=gold, **kwargs)["roc_auc"], None


def confusion_matrix_markdown(
    matrix: Sequence[Sequence[float]], label_values: Sequence[int], label_names: Sequence[str] | None = None
) -> str:
    """Rows are gold labels, columns predicted labels."""
    titles = [f"{v} ({n})" for v, n in zip(label_values, label_names, strict=True)] if label_names else label_values
    rows = [[title, *(f"{count:,}" for count in row)] for title, row in zip(titles, matrix, strict=True)]
    return markdown_table(rows, ["gold \\ predicted", *(str(t) for t in titles)])


# --- baselines -----------------------------------------------------------------------------------


def _label_order(train_labels: Sequence[int], label_values: Sequence[int] | None) -> tuple[int, ...]:
    values = tuple(int(v) for v in label_values) if label_values is not None else tuple(sorted(set(train_labels)))
    _checked_labels(train_labels, "training", values)
    return values


@dataclass(frozen=True)
class MajorityBaseline:
    """Predicts the most common training label for every text; its probabilities are the label priors."""

    label_values: tuple[int, ...]
    priors: np.ndarray
    name: str = "majority"

    @property
    def majority_label(self) -> int:
        return self.label_values[int(np.argmax(self.priors))]

    def __call__(self, texts: Sequence[str]) -> Predictions:
        probabilities = np.tile(self.priors, (len(texts), 1))
        return Predictions([self.majority_label] * len(texts), probabilities, self.label_values)


def majority_baseline(train_labels: Sequence[int], *, label_values: Sequence[int] | None = None) -> MajorityBaseline:
    """The floor every model must clear. Ties go to the label that comes first in ``label_values``."""
    labels = [int(v) for v in train_labels]
    if not labels:
        raise ValueError("no training labels")
    values = _label_order(labels, label_values)
    counts = Counter(labels)
    priors = np.array([counts[v] for v in values], dtype=float) / len(labels)
    return MajorityBaseline(values, priors)


@dataclass(frozen=True)
class TfidfLogregBaseline:
    """A scikit-learn pipeline of TF-IDF features and logistic regression."""

    pipeline: Any
    label_values: tuple[int, ...]
    name: str = "tfidf_logreg"

    def __call__(self, texts: Sequence[str]) -> Predictions:
        fitted = self.pipeline.predict_proba(list(texts))
        probabilities = np.zeros((len(texts), len(self.label_values)))
        for column, label in enumerate(self.pipeline.classes_):
            probabilities[:, self.label_values.index(int(label))] = fitted[:, column]
        labels = [self.label_values[i] for i in np.argmax(probabilities, axis=1)] if len(texts) else []
        return Predictions(labels, probabilities, self.label_values)


def tfidf_logreg_baseline(
    train_texts: Sequence[str], train_labels: Sequence[int], seed: int, *, label_values: Sequence[int] | None = None
) -> TfidfLogregBaseline:
    """The classic strong baseline: word and character n-gram TF-IDF, balanced logistic regression.

    Character n-grams (within word boundaries) catch spelling games a word vocabulary misses
    ("id1ot", "f*ck"); balanced class weights keep a rare positive label from being ignored.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    labels = [int(v) for v in train_labels]
    if len(labels) != len(train_texts):
        raise ValueError(f"{len(train_texts)} training texts but {len(labels)} labels")
    values = _label_order(labels, label_values)
    if len(set(labels)) < 2:
        raise ValueError(f"a classifier needs at least two labels in training; got only {sorted(set(labels))}")
    features = FeatureUnion(
        [
            ("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=200_000, dtype=np.float32)),
            (
                "char",
                TfidfVectorizer(
                    analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, max_features=300_000, dtype=np.float32
                ),
            ),
        ]
    )
    classifier = LogisticRegression(class_weight="balanced", max_iter=1_000, random_state=seed)
    pipeline = Pipeline([("tfidf", features), ("logreg", classifier)])
    pipeline.fit(list(train_texts), labels)
    return TfidfLogregBaseline(pipeline, values)


# --- agreement and mistakes ----------------------------------------------------------------------


def agreement(a: Sequence[int], b: Sequence[int]) -> dict[str, float | int]:
    """How often two labellers (say student and teacher) agree, raw and chance-corrected (Cohen's kappa)."""
    from sklearn.metrics import cohen_kappa_score

    first, second = [int(v) for v in a], [int(v) for v in b]
    if len(first) != len(second):
        raise ValueError(f"{len(first)} labels against {len(second)}")
    if not first:
        raise ValueError("no labels to compare")
    rate = float(np.mean(np.asarray(first) == np.asarray(second)))
    # Both giving one same label throughout leaves kappa 0/0 (scikit-learn answers NaN); the
    # agreement is perfect, so say so.
    kappa = 1.0 if len(set(first) | set(second)) == 1 else float(cohen_kappa_score(first, second))
    return {"agreement": rate, "cohen_kappa": kappa, "rows": len(first)}


@dataclass(frozen=True)
class Mistakes:
    """The most confident errors about the positive label; rows hold row, text, gold, predicted, score."""

    positive: int
    false_positives: list[dict[str, Any]]
    false_negatives: list[dict[str, Any]]

    def markdown(self) -> str:
        columns = ["row", "text", "gold", "predicted", "score"]
        parts = []
        for title, rows in (
            (f"False positives (predicted {self.positive}; highest score first)", self.false_positives),
            (f"False negatives (gold {self.positive}; lowest score first)", self.false_negatives),
        ):
            table = (
                markdown_table([{**r, "score": _format_cell(r["score"])} for r in rows], columns) if rows else "_none_"
            )
            parts.append(f"**{title}**\n\n{table}")
        return "\n\n".join(parts)


def mistakes_table(
    texts: Sequence[str],
    gold: Sequence[int],
    predicted: Sequence[int],
    scores: Sequence[float] | None,
    positive: int,
    k: int = 10,
) -> Mistakes:
    """The ``k`` worst false positives and false negatives, by the model's confidence.

    ``scores`` is the probability of ``positive`` per example: a false positive is worse the higher
    it scored, a false negative the lower. Without scores, errors keep their row order.
    """
    n = len(texts)
    if not (len(gold) == len(predicted) == n) or (scores is not None and len(scores) != n):
        raise ValueError("texts, gold, predicted (and scores) must have one entry per row")
    score_of: list[float | None] = [float(s) for s in scores] if scores is not None else [None] * n

    def row(i: int) -> dict[str, Any]:
        return {"row": i, "text": texts[i], "gold": int(gold[i]), "predicted": int(predicted[i]), "score": score_of[i]}

    false_positives = [i for i in range(n) if predicted[i] == positive and gold[i] != positive]
    false_negatives = [i for i in range(n) if gold[i] == positive and predicted[i] != positive]
    if scores is not None:
        # sorted() is stable, so equal scores keep row order.
        false_positives.sort(key=lambda i: -score_of[i])
        false_negatives.sort(key=lambda i: score_of[i])
    return Mistakes(positive, [row(i) for i in false_positives[:k]], [row(i) for i in false_negatives[:k]])


# --- tables and speed ----------------------------------------------------------------------------


def _format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING_CELL
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def comparison_table(results: Mapping[str, Mapping[str, Any]], *, columns: Sequence[str] = COMPARISON_COLUMNS) -> str:
    """One test set's results as markdown: a row per model (in the given order), a column per metric.

    Columns that no model reports are left out; a model lacking one shows a dash.
    """
    shown = [c for c in columns if any(metrics.get(c) is not None for metrics in results.values())]
    rows = [[model, *(_score_cell(metrics, c) for c in shown)] for model, metrics in results.items()]
    return markdown_table(rows, ["model", *shown])


#: A metric's 95% interval sits beside it under this suffix, as ``[low, high]``.
INTERVAL_SUFFIX = "_ci"


def _score_cell(metrics: Mapping[str, Any], column: str) -> str:
    """A score, followed by its 95% interval where the results carry one: ``0.912 [0.887, 0.934]``."""
    cell = _format_cell(metrics.get(column))
    interval = metrics.get(column + INTERVAL_SUFFIX)
    if interval is not None and metrics.get(column) is not None:
        cell += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return cell


def comparison_report(
    results_by_test_set: Mapping[str, Mapping[str, Mapping[str, Any]]], *, columns: Sequence[str] = COMPARISON_COLUMNS
) -> str:
    """A comparison table per test set, each under its name as a heading."""
    return "\n\n".join(
        f"#### {test_set}\n\n{comparison_table(results, columns=columns)}"
        for test_set, results in results_by_test_set.items()
    )


def latency_throughput(
    predict_fn: Callable[[Sequence[str]], Any], texts: Sequence[str], batch_size: int, *, warmup_batches: int = 1
) -> dict[str, float | int]:
    """Wall-clock latency per batch (p50, p95, in ms) and throughput (rows/s) of ``predict_fn``.

    The first ``warmup_batches`` batches run untimed first (lazy initialisation, kernel compilation
    and caches would otherwise count). ``predict_fn`` must return finished results: on a GPU, copy
    them to the host, or an asynchronous launch is all that gets timed.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    if not texts:
        raise ValueError("no texts to time")
    batches = [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]
    for batch in batches[:warmup_batches]:
        predict_fn(batch)
    latencies = []
    started = time.perf_counter()
    for batch in batches:
        batch_started = time.perf_counter()
        predict_fn(batch)
        latencies.append(time.perf_counter() - batch_started)
    elapsed = time.perf_counter() - started
    return {
        "rows": len(texts),
        "batch_size": batch_size,
        "batches": len(batches),
        "latency_p50_ms": float(np.percentile(latencies, 50) * 1000),
        "latency_p95_ms": float(np.percentile(latencies, 95) * 1000),
        "rows_per_s": float(len(texts) / elapsed) if elapsed > 0 else math.inf,
    }
