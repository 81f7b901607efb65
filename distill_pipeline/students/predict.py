"""Labelling texts with a student: an adapter loaded as a Predictor, and whole tables labelled."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill_pipeline.core.store import atomic_file
from distill_pipeline.students.evaluation import (
    Predictions,
    Predictor,
)
from distill_pipeline.students.specs import TEXT_COLUMN

PREDICT_BATCH_SIZE = 32
Log = Callable[[str], None]


def load_adapter_student(adapter_dir: Path, *, device: str = "auto", log: Log = print) -> Any:
    """The trainer's Student for an adapter folder (imports torch, transformers and peft)."""
    from distill_pipeline.trainer.predict import load_student

    return load_student(adapter_dir, device=device, log=log)


def student_predictor(student: Any, batch_size: int = PREDICT_BATCH_SIZE) -> Predictor:
    """A student as an evaluation Predictor: texts to labels and probabilities."""
    values = tuple(int(v) for v in student.labels.values)

    def predict(texts: Sequence[str]) -> Predictions:
        labels, probabilities = student.predict(list(texts), batch_size=batch_size)
        return Predictions(labels, np.asarray(probabilities, dtype=float).reshape(len(labels), len(values)), values)

    return predict


def read_texts(path: Path, text_column: str) -> tuple[Any, list[str]]:
    """A Parquet or JSON Lines table and its text column (as strings)."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        table = pq.read_table(path)
    elif suffix in (".jsonl", ".json"):
        table = pj.read_json(path)
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl file")
    if text_column not in table.column_names:
        raise ValueError(f"{path} has no column {text_column!r}; it has {table.column_names}")
    texts = table.column(text_column).to_pylist()
    missing = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if missing:
        raise ValueError(f"{path}: {len(missing)} row(s) without a text in {text_column!r}, first at row {missing[0]}")
    return table, texts


def predict_table(
    predictor: Predictor,
    label_names: Sequence[str],
    input_path: Path,
    output_path: Path,
    text_column: str = TEXT_COLUMN,
) -> int:
    """Label every row of a table; the output is the input plus ``predicted_label``,
    ``predicted_name`` and ``p_<name>`` per label, written atomically as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table, texts = read_texts(input_path, text_column)
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


