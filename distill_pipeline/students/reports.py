"""The evaluation report: a student against the teacher, gold labels and baselines on the frozen test sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.core.task import Task
from distill_pipeline.students.ablation import TEST_SETS
from distill_pipeline.students.evaluation import (
    COMPARISON_COLUMNS,
    INTERVAL_SUFFIX,
    Predictions,
    Predictor,
    agreement,
    comparison_report,
    evaluate_predictions,
    latency_throughput,
    majority_baseline,
    mistakes_table,
    tfidf_logreg_baseline,
)
from distill_pipeline.students.predict import Log
from distill_pipeline.students.specs import LABEL_COLUMN, TEXT_COLUMN
from distill_pipeline.students.statistics import bootstrap_interval
from distill_pipeline.students.traffic import DeploymentPrior, accuracy_at_prior

#: A test-set column with independent (human) labels; when present the teacher is scored too.
GOLD_COLUMN = "gold_label"
STUDENT, TEACHER, MAJORITY, TFIDF = "student", "teacher", "majority", "tfidf_logreg"
PREDICT_BATCH_SIZE = 32
MISTAKES_PER_KIND = 10
#: The scores reported with a 95% bootstrap interval over the test rows.
INTERVAL_METRICS = ("accuracy", "f1")
#: Columns of the per-row predictions table an evaluation publishes beside its report.
ROW_COLUMNS = ("test_set", "row", LABEL_COLUMN, GOLD_COLUMN)
#: The models whose predictions are kept per row (the teacher's are the test labels themselves).
ROW_MODELS = (STUDENT, TFIDF, MAJORITY)
NO_GOLD = -1
# Timing rows: enough for stable percentiles, few enough to keep a CPU evaluation short.
SPEED_ROWS = 256
SINGLE_REQUEST_ROWS = 32


@dataclass(frozen=True)
class LabelledTexts:
    """A test or training table: texts, the teacher's labels and, when the table has them, gold labels."""

    name: str
    texts: list[str]
    labels: list[int]
    #: A human label per row, None where a row has none; None when no row has one.
    gold: list[int | None] | None = None

    def gold_rows(self) -> list[int]:
        """The rows with a gold label: gold scores are measured on these."""
        return [] if self.gold is None else [row for row, value in enumerate(self.gold) if value is not None]


def read_labelled(path: Path, name: str) -> LabelledTexts:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    texts = table.column(TEXT_COLUMN).to_pylist()
    labels = [int(v) for v in table.column(LABEL_COLUMN).to_pylist()]
    gold = None
    if GOLD_COLUMN in table.column_names:
        gold = [None if v is None else int(v) for v in table.column(GOLD_COLUMN).to_pylist()]
    return LabelledTexts(name, texts, labels, gold if gold and any(v is not None for v in gold) else None)


def with_gold(test_set: LabelledTexts, gold_by_text: Mapping[str, int]) -> LabelledTexts:
    """The test set with the gold label of every row whose text the gold table labels (a row's own wins)."""
    own = test_set.gold or [None] * len(test_set.texts)
    gold = [g if g is not None else gold_by_text.get(text) for g, text in zip(own, test_set.texts, strict=True)]
    has_any = any(v is not None for v in gold)
    return LabelledTexts(test_set.name, test_set.texts, test_set.labels, gold if has_any else None)


def _gold_subset(test_set: LabelledTexts) -> tuple[list[int], list[int]]:
    """The rows with gold and their gold labels."""
    rows = test_set.gold_rows()
    return rows, [int(test_set.gold[row]) for row in rows] if test_set.gold else []


def _rows_of(predicted: Predictions, rows: list[int]) -> Predictions:
    return Predictions([predicted.labels[row] for row in rows], predicted.probabilities[rows], predicted.label_values)


# The comparison table's columns and their intervals; the confusion matrix and notes stay in the JSON report.
_SCORE_KEYS = (*COMPARISON_COLUMNS, *(m + INTERVAL_SUFFIX for m in INTERVAL_METRICS), "rows")


def _scores(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in _SCORE_KEYS if key in metrics}


def with_intervals(
    task: Task, reference: Sequence[int], predicted: Sequence[int], metrics: dict[str, Any]
) -> dict[str, Any]:
    """``metrics`` with the 95% bootstrap interval over the rows of each of INTERVAL_METRICS."""
    for metric in INTERVAL_METRICS:
        interval = bootstrap_interval(
            reference,
            predicted,
            task.label.values,
            metric,
            task.label.positive,
            resamples=task.promotion.resamples,
            seed=task.promotion.seed,
        )
        metrics[metric + INTERVAL_SUFFIX] = [interval.low, interval.high]
    return metrics


def _evaluate(task: Task, reference: Sequence[int], predicted: Predictions) -> dict[str, Any]:
    positive = task.label.positive
    metrics = evaluate_predictions(
        reference,
        predicted.labels,
        predicted.scores(positive),
        task.label.values,
        positive,
        label_names=list(task.label.names),
    )
    return with_intervals(task, reference, predicted.labels, metrics)


def _against_teacher(task: Task, test_set: LabelledTexts, predicted: Predictions) -> dict[str, Any]:
    """Scores against the test labels (the teacher's), with chance-corrected agreement."""
    metrics = _evaluate(task, test_set.labels, predicted)
    return metrics | {k: v for k, v in agreement(predicted.labels, test_set.labels).items() if k != "rows"}


def evaluate_on_test_sets(
    task: Task,
    student: Predictor,
    train: LabelledTexts,
    test_sets: Sequence[LabelledTexts],
    *,
    speed_batch_size: int = PREDICT_BATCH_SIZE,
    log: Log = print,
    at_prior: tuple[DeploymentPrior, Predictor] | None = None,
) -> dict[str, Any]:
    """Student, teacher, majority and TF-IDF + logistic regression side by side on each test set.

    The test labels are the teacher's labels, so every model is scored against the teacher (the
    reference, 1 by definition) and its agreement with the teacher is reported; where a test set
    also has gold labels, every model including the teacher is scored against gold too. The
    baselines are trained on the same training set as the student.

    ``at_prior`` (a deployment's share of positives, and the student deciding at that share) adds
    each test set reweighted to that share: the accuracy traffic at that rate would see.
    """
    positive = task.label.positive
    log(f"training the baselines on {len(train.texts):,} rows")
    predictors: dict[str, Predictor] = {
        STUDENT: student,
        TFIDF: tfidf_logreg_baseline(train.texts, train.labels, task.splits.seed, label_values=task.label.values),
        MAJORITY: majority_baseline(train.labels, label_values=task.label.values),
    }
    report: dict[str, Any] = {"reference": "teacher", "test_sets": {}}
    for test_set in test_sets:
        predictions = {name: predict(test_set.texts) for name, predict in predictors.items()}
        vs_teacher = {name: _against_teacher(task, test_set, predicted) for name, predicted in predictions.items()}
        vs_gold = None
        rows, gold = _gold_subset(test_set)
        if rows:
            # The teacher gives labels only: no scores, so no ROC AUC for it.
            teacher_on_gold = [test_set.labels[row] for row in rows]
            vs_gold = {
                TEACHER: with_intervals(
                    task,
                    gold,
                    teacher_on_gold,
                    evaluate_predictions(
                        gold, teacher_on_gold, None, task.label.values, positive, label_names=list(task.label.names)
                    ),
                ),
                **{name: _evaluate(task, gold, _rows_of(predicted, rows)) for name, predicted in predictions.items()},
            }
        entry: dict[str, Any] = {
            "rows": len(test_set.texts),
            "has_gold": bool(rows),
            "gold_rows": len(rows),
            "vs_teacher": {
                TEACHER: {"agreement": 1.0, "cohen_kappa": 1.0, "rows": len(test_set.labels)},
                **{name: _scores(m) for name, m in vs_teacher.items()},
            },
            "vs_gold": {name: _scores(m) for name, m in vs_gold.items()} if vs_gold else None,
            "confusion": {
                name: {k: m[k] for k in ("confusion_matrix", "confusion_matrix_markdown", "roc_auc_note") if k in m}
                for name, m in vs_teacher.items()
            },
        }
        entry["row_predictions"] = {
            LABEL_COLUMN: list(test_set.labels),
            GOLD_COLUMN: [NO_GOLD if g is None else g for g in (test_set.gold or [None] * len(test_set.labels))],
            **{name: list(predictions[name].labels) for name in ROW_MODELS},
        }
        if positive is not None:
            student_predictions = predictions[STUDENT]
            mistakes = mistakes_table(
                test_set.texts,
                test_set.labels,
                student_predictions.labels,
                student_predictions.scores(positive).tolist(),
                positive,
                k=MISTAKES_PER_KIND,
            )
            entry["mistakes"] = {
                "false_positives": mistakes.false_positives,
                "false_negatives": mistakes.false_negatives,
            }
            entry["mistakes_markdown"] = mistakes.markdown()
        if at_prior is not None:
            traffic = _at_prior(task, test_set, *at_prior, rows, gold)
            if traffic is not None:
                entry["at_deployment_prior"] = traffic
        report["test_sets"][test_set.name] = entry
    if any(t.gold_rows() for t in test_sets):
        report["reference"] = "teacher and gold"
    speed_texts = [text for t in test_sets for text in t.texts][:SPEED_ROWS]
    report["speed"] = {
        "batched": latency_throughput(student, speed_texts, speed_batch_size),
        "single_request": latency_throughput(student, speed_texts[:SINGLE_REQUEST_ROWS], 1),
    }
    return report


def _at_prior(
    task: Task,
    test_set: LabelledTexts,
    prior: DeploymentPrior,
    student: Predictor,
    gold_rows: Sequence[int],
    gold: Sequence[int],
) -> dict[str, Any] | None:
    """The student (deciding at ``prior``) and, on gold, the teacher, scored on the test set
    reweighted to ``prior``; None where the set lacks a class or the task has no positive label."""
    positive = task.label.positive
    if positive is None or len(task.label.values) != 2 or len(set(test_set.labels)) < 2:
        return None
    predicted = list(student(test_set.texts).labels)
    resampling = {"resamples": task.promotion.resamples, "seed": task.promotion.seed}
    entry: dict[str, Any] = {
        "prior": prior.share,
        "source": prior.describe(),
        "vs_teacher": {
            STUDENT: accuracy_at_prior(test_set.labels, predicted, positive, prior.share, **resampling).to_dict()
        },
        "vs_gold": None,
    }
    if gold_rows and len(set(gold)) == 2:
        teacher = [test_set.labels[row] for row in gold_rows]
        entry["vs_gold"] = {
            TEACHER: accuracy_at_prior(gold, teacher, positive, prior.share, **resampling).to_dict(),
            STUDENT: accuracy_at_prior(
                gold, [predicted[row] for row in gold_rows], positive, prior.share, **resampling
            ).to_dict(),
        }
    return entry


def at_prior_markdown(report: Mapping[str, Any]) -> str | None:
    """Accuracy at the deployment's share of positives, per test set and reference; None without it."""
    lines, source = [], None
    for name, entry in report["test_sets"].items():
        traffic = entry.get("at_deployment_prior")
        if traffic is None:
            continue
        source = traffic["source"]
        for reference in ("vs_teacher", "vs_gold"):
            for model, interval in (traffic[reference] or {}).items():
                lines.append(
                    (
                        TEST_SETS.get(name, name),
                        "teacher" if reference == "vs_teacher" else "gold",
                        model,
                        f"{interval['estimate']:.4f} [{interval['low']:.3f}, {interval['high']:.3f}]",
                    )
                )
    if not lines:
        return None
    table = markdown_table(lines, ["test set", "labels", "model", "accuracy at the deployment prior [95% CI]"])
    return f"Every test set reweighted to {source}; the student decides at that share too.\n\n{table}"


def reference_note(report: Mapping[str, Any]) -> str:
    """What the scores in a report are measured against, in a sentence or two."""
    with_gold = [
        f"{name} ({entry.get('gold_rows', entry['rows']):,} of {entry['rows']:,} rows)"
        for name, entry in report["test_sets"].items()
        if entry["has_gold"]
    ]
    note = (
        "The test labels are the teacher's own labels, so the teacher is the reference: each model's "
        "scores are its agreement with the teacher, and the teacher's row is 1 by definition."
    )
    if with_gold:
        note += (
            f" Gold (human) labels exist for {', '.join(with_gold)}: on those rows every model, the teacher "
            "included, is also scored against gold."
        )
    else:
        note += " No test set has gold labels, so the teacher's own accuracy is not measured here."
    return note


def report_markdown(report: Mapping[str, Any]) -> str:
    """The whole evaluation report for people: comparisons, gold scores, confusion, mistakes, speed."""
    parts = [
        f"_{reference_note(report)}_",
        comparison_report({name: e["vs_teacher"] for name, e in report["test_sets"].items()}),
    ]
    gold = {name: e["vs_gold"] for name, e in report["test_sets"].items() if e["vs_gold"]}
    if gold:
        parts += ["### Against gold labels", comparison_report(gold)]
    for name, entry in report["test_sets"].items():
        parts += [
            f"### {TEST_SETS.get(name, name)}: student confusion matrix",
            entry["confusion"][STUDENT]["confusion_matrix_markdown"],
        ]
        if "mistakes_markdown" in entry:
            parts += [f"### {TEST_SETS.get(name, name)}: student mistakes", entry["mistakes_markdown"]]
    traffic = at_prior_markdown(report)
    if traffic is not None:
        parts += ["### At the deployment's share of positives", traffic]
    parts += ["### Student speed", speed_markdown(report["speed"])]
    return "\n\n".join(parts)


def speed_markdown(speed: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [
        (
            kind,
            value["batch_size"],
            value["rows"],
            f"{value['latency_p50_ms']:.1f}",
            f"{value['latency_p95_ms']:.1f}",
            f"{value['rows_per_s']:,.1f}",
        )
        for kind, value in speed.items()
    ]
    return markdown_table(rows, ["mode", "batch size", "rows", "p50 ms / batch", "p95 ms / batch", "rows/s"])


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Every model's scores as ``<model>_<metric>_<test set>`` floats, for the UI to chart."""
    flat: dict[str, float] = {}
    for test_set, entry in report["test_sets"].items():
        traffic = entry.get("at_deployment_prior")
        for reference, suffix in (("vs_teacher", ""), ("vs_gold", "_vs_gold")):
            for model, interval in ((traffic or {}).get(reference) or {}).items():
                for key, name in (("estimate", ""), ("low", "_low"), ("high", "_high")):
                    flat[f"{model}_accuracy_at_prior_{test_set}{suffix}{name}"] = float(interval[key])
        for reference, suffix in (("vs_teacher", ""), ("vs_gold", "_vs_gold")):
            for model, scores in (entry[reference] or {}).items():
                if model == TEACHER and reference == "vs_teacher":
                    continue
                for metric in COMPARISON_COLUMNS:
                    value = scores.get(metric)
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        flat[f"{model}_{metric}_{test_set}{suffix}"] = float(value)
                    for metric in INTERVAL_METRICS:
                        interval = scores.get(metric + INTERVAL_SUFFIX)
                        if interval is not None:
                            flat[f"{model}_{metric}_{test_set}{suffix}_low"] = float(interval[0])
                            flat[f"{model}_{metric}_{test_set}{suffix}_high"] = float(interval[1])
    for kind, value in report["speed"].items():
        flat[f"student_rows_per_s_{kind}"] = float(value["rows_per_s"])
        flat[f"student_latency_p50_ms_{kind}"] = float(value["latency_p50_ms"])
    return flat


def scores_by_test_set(
    report: Mapping[str, Any], model: str, *, against: str = "vs_teacher"
) -> dict[str, dict[str, Any]]:
    """One model's scores per test set (``against``: ``vs_teacher`` or ``vs_gold``); test sets
    without that reference are left out."""
    return {
        name: dict(entry[against][model])
        for name, entry in report["test_sets"].items()
        if entry.get(against) and model in entry[against]
    }


# --- per-row predictions, for paired comparisons of models on the same rows --------------------


@dataclass(frozen=True)
class RowPredictions:
    """One test set's rows: the test (teacher) labels, gold labels (NO_GOLD where none), each model's prediction."""

    test_set: str
    labels: np.ndarray
    gold: np.ndarray
    models: dict[str, np.ndarray]

    def reference(self, against: str = "vs_teacher") -> tuple[np.ndarray, np.ndarray]:
        """The rows scored against ``against`` (``vs_teacher``: all; ``vs_gold``: those with gold) and their labels."""
        if against == "vs_teacher":
            return np.arange(len(self.labels)), self.labels
        rows = np.flatnonzero(self.gold != NO_GOLD)
        return rows, self.gold[rows]


def split_row_predictions(report: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The report without its per-row predictions, and those predictions as one Arrow table.

    Rows keep their test-set order, so two reports measured on the same test-set version pair row by row.
    """
    import pyarrow as pa

    columns: dict[str, list[Any]] = {name: [] for name in (*ROW_COLUMNS, *ROW_MODELS)}
    test_sets = {}
    for name, entry in report["test_sets"].items():
        entry = dict(entry)
        rows = entry.pop("row_predictions")
        columns["test_set"] += [name] * len(rows[LABEL_COLUMN])
        columns["row"] += list(range(len(rows[LABEL_COLUMN])))
        for column in (LABEL_COLUMN, GOLD_COLUMN, *ROW_MODELS):
            columns[column] += [int(v) for v in rows[column]]
        test_sets[name] = entry
    table = pa.table(
        {name: pa.array(values, pa.string() if name == "test_set" else pa.int64()) for name, values in columns.items()}
    )
    return {**report, "test_sets": test_sets}, table


def read_row_predictions(path: Path) -> dict[str, RowPredictions]:
    """A published predictions table, per test set, rows in test-set order."""
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    missing = [c for c in (*ROW_COLUMNS, STUDENT) if c not in table]
    if missing:
        raise ValueError(f"{path} is not a predictions table: it lacks {missing}")
    by_set: dict[str, RowPredictions] = {}
    names = np.asarray(table["test_set"], dtype=object)
    order = np.asarray(table["row"], dtype=np.int64)
    for name in dict.fromkeys(table["test_set"]):
        picked = np.flatnonzero(names == name)
        picked = picked[np.argsort(order[picked], kind="stable")]

        def column(key: str, picked: np.ndarray = picked) -> np.ndarray:
            return np.asarray(table[key], dtype=np.int64)[picked]

        models = {model: column(model) for model in ROW_MODELS if model in table}
        by_set[name] = RowPredictions(name, column(LABEL_COLUMN), column(GOLD_COLUMN), models)
    return by_set
