"""Gold labels: what humans say the right answer is, kept apart from anything a teacher said.

A gold table has ``input`` and ``gold_label`` columns, and optionally ``test_set``. It lives in
the store at ``gold/labels.parquet`` (``distill-pipeline gold`` puts a user's table there, and
keeps the one it replaces under ``gold/history/``). It scores teachers (``teacher_eval``) and,
where it labels rows of the frozen test sets, every model of an evaluation report, the teacher
included.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distill_pipeline.core.errors import UsageError
from distill_pipeline.core.layout import GOLD_LABELS
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.task import LabelSpec

GOLD_TEXT, GOLD_LABEL, GOLD_SET = "input", "gold_label", "test_set"
#: Every gold table that a new one replaced, as ``<UTC time>.parquet``.
GOLD_HISTORY = "gold/history/"


class GoldTableError(UsageError):
    """The gold table is missing, empty, lacks columns, or has labels outside the task's label set."""


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
    fewer rows than it claims, so one bad row refuses the whole table, naming the first few. A
    text has one gold label, whatever test sets it is in (evaluation matches gold rows by text).
    A table without rows is refused: it would replace the gold table with nothing.
    """
    wanted = {text_column: "--text-column", label_column: "--label-column"}
    if test_set_column:
        wanted[test_set_column] = "--test-set-column"
    for name, option in wanted.items():
        if name not in table.column_names:
            raise GoldTableError(
                f"no column {name!r} in the table; it has {table.column_names}: name the right one with {option}"
            )
    if table.num_rows == 0:
        raise GoldTableError("the table has no rows: a gold table needs labelled rows (the current one is kept)")
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
    seen: dict[str, int] = {}
    for row, (text, value, test_set) in enumerate(zip(texts, labels, sets, strict=True)):
        first = seen.setdefault(str(text), row)
        if labels[first] != value:
            where = f" (test sets {sets[first]!r} and {test_set!r})" if sets[first] != test_set else ""
            problems.append(f"rows {first} and {row}: the same text with labels {labels[first]} and {value}{where}")
    if problems:
        raise GoldTableError(
            f"{len(problems):,} conflicting labels: {'; '.join(problems[:5])}; give each text one label"
        )
    columns = {GOLD_TEXT: pa.array([str(t) for t in texts], pa.string()), GOLD_LABEL: pa.array(labels, pa.int64())}
    if test_set_column:
        columns[GOLD_SET] = pa.array([str(name) for name in sets], pa.string())
    return pa.table(columns)


def publish_gold_table(store: ObjectStore, gold: pa.Table) -> str | None:
    """Make ``gold`` the store's gold table; returns the key the replaced one is kept under, if any.

    The previous table is copied to ``gold/history/<UTC time>.parquet`` before the new one is
    written, so a mistaken ``gold`` command can be undone by copying it back.
    """
    kept = None
    if store.exists(GOLD_LABELS):
        kept = f"{GOLD_HISTORY}{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.parquet"
        store.put_bytes(kept, store.get_bytes(GOLD_LABELS))
    sink = pa.BufferOutputStream()
    pq.write_table(gold, sink)
    store.put_bytes(GOLD_LABELS, sink.getvalue().to_pybytes())
    return kept


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
