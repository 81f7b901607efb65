"""Gold labels: what humans say the right answer is, kept apart from anything a teacher said.

A gold table has ``input`` and ``gold_label`` columns, and optionally ``test_set``. It lives in
the store at ``gold/labels.parquet`` (``distill-pipeline gold`` puts a user's table there). It
scores teachers (``teacher_eval``) and, where it labels rows of the frozen test sets, every model
of an evaluation report, the teacher included.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distill_pipeline.core.task import LabelSpec

GOLD_TEXT, GOLD_LABEL, GOLD_SET = "input", "gold_label", "test_set"


class GoldTableError(ValueError):
    """The gold table is missing, lacks columns, or has labels outside the task's label set."""


def gold_table_from(
    table: pa.Table,
    label: LabelSpec,
    *,
    text_column: str = GOLD_TEXT,
    label_column: str = GOLD_LABEL,
    test_set_column: str | None = None,
) -> pa.Table:
    """A user's labelled table as the gold table ``teacher_eval`` reads: ``input``, ``gold_label`` (and ``test_set``).

    A label may be written as the task's value (``1``) or its name (``toxic``, any case). Every
    row must have a text and a known label: a gold table with holes would score teachers on
    fewer rows than it claims, so one bad row refuses the whole table, naming the first few.
    """
    wanted = [text_column, label_column] + ([test_set_column] if test_set_column else [])
    missing = [name for name in wanted if name not in table.column_names]
    if missing:
        raise GoldTableError(f"no column {missing[0]!r} in the table; it has {table.column_names}")
    by_text = {str(value): value for value in label.values}
    by_text.update({name.strip().lower(): value for name, value in zip(label.names, label.values, strict=True)})
    texts = table.column(text_column).to_pylist()
    raw_labels = table.column(label_column).to_pylist()
    labels: list[int] = []
    problems: list[str] = []
    for row, (text, raw) in enumerate(zip(texts, raw_labels, strict=True)):
        value = by_text.get(str(raw).strip().lower().removesuffix(".0")) if raw is not None else None
        if text is None or not str(text).strip():
            problems.append(f"row {row}: no text")
        elif value is None:
            problems.append(f"row {row}: label {raw!r} is none of {list(label.values)} or {list(label.names)}")
        labels.append(-1 if value is None else value)
    if problems:
        shown = "; ".join(problems[:5])
        raise GoldTableError(f"{len(problems):,} of {table.num_rows:,} rows cannot be gold: {shown}")
    sets = [None] * table.num_rows
    if test_set_column:
        sets = table.column(test_set_column).to_pylist()
        if any(name is None or not str(name).strip() for name in sets):
            raise GoldTableError(f"column {test_set_column!r} names no test set on some rows")
    seen: dict[tuple[str, str | None], int] = {}
    for row, (text, value, test_set) in enumerate(zip(texts, labels, sets, strict=True)):
        first = seen.setdefault((str(text), test_set), row)
        if labels[first] != value:
            problems.append(f"rows {first} and {row}: the same text with labels {labels[first]} and {value}")
    if problems:
        raise GoldTableError(f"{len(problems):,} conflicting labels: {'; '.join(problems[:5])}")
    columns = {GOLD_TEXT: pa.array([str(t) for t in texts], pa.string()), GOLD_LABEL: pa.array(labels, pa.int64())}
    if test_set_column:
        columns[GOLD_SET] = pa.array([str(name) for name in sets], pa.string())
    return pa.table(columns)


def read_gold_labels(path: Path) -> dict[str, int]:
    """The gold label of each text in a gold table (Parquet); one text with two labels is refused."""
    table = pq.read_table(path)
    missing = {GOLD_TEXT, GOLD_LABEL} - set(table.column_names)
    if missing:
        raise GoldTableError(f"{path.name}: no column {sorted(missing)[0]!r}; it has {table.column_names}")
    labels: dict[str, int] = {}
    for text, value in zip(table.column(GOLD_TEXT).to_pylist(), table.column(GOLD_LABEL).to_pylist(), strict=True):
        if text is None or value is None:
            continue
        if labels.setdefault(text, int(value)) != int(value):
            raise GoldTableError(f"{path.name}: the text {text[:60]!r} has gold labels {labels[text]} and {value}")
    return labels
