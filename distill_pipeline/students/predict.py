"""Labelling texts with a student: an adapter loaded as a Predictor, and whole tables labelled."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill_pipeline.core.errors import UsageError
from distill_pipeline.core.store import atomic_file
from distill_pipeline.students.evaluation import (
    Predictions,
    Predictor,
)

PREDICT_BATCH_SIZE = 32
Log = Callable[[str], None]


class PredictionError(UsageError):
    """What to label, or the adapter to label it with, is not usable; the message says why."""


def load_adapter_student(adapter_dir: Path, *, device: str = "auto", log: Log = print) -> Any:
    """The trainer's Student for an adapter folder (imports torch, transformers and peft); an
    adapter the trainer refuses (no safetensors, corrupt weights) is a :class:`PredictionError`."""
    from distill_pipeline.trainer.model import WeightsError
    from distill_pipeline.trainer.predict import load_student

    try:
        return load_student(adapter_dir, device=device, log=log)
    except WeightsError as exc:
        raise PredictionError(str(exc)) from exc


def student_predictor(
    student: Any, batch_size: int = PREDICT_BATCH_SIZE, prior: float | str | None = None, log: Log | None = None
) -> Predictor:
    """A student as an evaluation Predictor: texts to labels and probabilities.

    ``prior``: the share of positives the texts are expected to have (a number), ``"auto"`` to
    estimate it from each call's texts, or None for the student's training prior (see the
    trainer's ``predict_under_prior``). ``log`` hears which prior each call used.
    """
    values = tuple(int(v) for v in student.labels.values)

    def predict(texts: Sequence[str]) -> Predictions:
        labels, probabilities, used = student.predict_under_prior(list(texts), batch_size=batch_size, prior=prior)
        if log is not None and prior is not None:
            log(describe_prior(student, used, len(texts)))
        return Predictions(labels, np.asarray(probabilities, dtype=float).reshape(len(labels), len(values)), values)

    return predict


def describe_prior(student: Any, used: float | None, rows: int) -> str:
    """One line on the class prior a prediction used."""
    from distill_pipeline.trainer.calibration import MIN_PRIOR_ESTIMATE_ROWS

    rule = student.decision
    if rule is None or rule.train_prior is None:
        return "class prior: the student's training prior (the adapter records no training prior to shift from)"
    name = student.labels.names[student.labels.index_of(rule.positive_label)]
    if used is None:
        why = f"fewer than {MIN_PRIOR_ESTIMATE_ROWS} rows to estimate another" if rows < MIN_PRIOR_ESTIMATE_ROWS else ""
        return f"class prior: the training share of {name}, {rule.train_prior:.1%}" + (f" ({why})" if why else "")
    return f"class prior: {used:.1%} {name} (the student was trained at {rule.train_prior:.1%})"


def read_table_to_label(input_path: Path, text_column: str, output_path: Path) -> tuple[Any, list[str]]:
    """A CSV, Parquet or JSONL table and its texts, checked before any model loads: the output
    must not be the input (labelling writes a new file, it never replaces the table it reads),
    and every row needs a text."""
    from distill_pipeline.logs.importer import read_source_table

    if output_path.exists() and input_path.exists() and output_path.samefile(input_path):
        raise PredictionError(f"the output {str(output_path)!r} is the input table: write the labels to another file")
    table = read_source_table(input_path)
    if text_column not in table.column_names:
        raise PredictionError(
            f"{str(input_path)!r} has no column {text_column!r}; it has {table.column_names}: "
            "name the text column (--text-column)"
        )
    texts = table.column(text_column).to_pylist()
    missing = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if missing:
        raise PredictionError(
            f"{str(input_path)!r}: {len(missing)} row(s) without a text in {text_column!r}, the first at row "
            f"{missing[0]}: fill or drop them"
        )
    return table, texts


def label_table(
    predictor: Predictor, label_names: Sequence[str], table: Any, texts: list[str], output_path: Path
) -> int:
    """Label every row of a table read by :func:`read_table_to_label`; the output is the input plus
    ``predicted_label``, ``predicted_name`` and ``p_<name>`` per label, written atomically as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    predictions = predictor(texts)
    names = dict(zip(predictions.label_values, label_names, strict=True))
    added = {
        "predicted_label": pa.array(predictions.labels, pa.int64()),
        "predicted_name": pa.array([names[v] for v in predictions.labels], pa.string()),
    }
    for column, name in enumerate(label_names):
        added[f"p_{name}"] = pa.array(predictions.probabilities[:, column] if texts else [], pa.float64())
    for column, values in added.items():
        if column in table.column_names:
            table = table.drop_columns([column])
        table = table.append_column(column, values)
    with atomic_file(output_path) as handle:
        pq.write_table(table, handle)
    return table.num_rows
