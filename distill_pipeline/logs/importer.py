"""Import an existing table of teacher calls (CSV, Parquet, JSONL) into log objects in a store.

A :class:`ColumnMapping` says which source column fills which log field, with constants for
fields the table lacks. The import is idempotent: request ids are taken from a column or derived
from a hash of the row, and the object names depend only on the table's name and bytes, so
importing the same table twice overwrites the same objects with the same bytes, and a re-import
that puts its rows on other days (a corrected ``default_day``) removes the earlier import's
objects from the days it no longer writes. Every row read is either written or counted as
skipped under a named reason. Columns are checked, not coerced: a mapped column of the wrong type
(a boolean answer, a list, a number that is not finite) refuses the import, naming the column and
its first bad row.

DuckDB does the row work (casts, hashes, JSON encoding) so a million rows take seconds.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from distill_pipeline.core.errors import UsageError
from distill_pipeline.core.store import ObjectStore, file_sha256
from distill_pipeline.core.task import Task
from distill_pipeline.logs.schema import (
    LOG_PREFIX,
    MAX_REQUEST_ID_CHARS,
    SCHEMA_FIELDS,
    SCHEMA_VERSION,
    day_of,
    log_object_key,
    log_object_prefix,
)

DEFAULT_MAX_RECORDS_PER_OBJECT = 50_000
DEFAULT_USER_ID = "anonymous"  # LogRecord's default for a caller that names no user

SOURCE_FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}

# Names the importer adds to the source table; a source may not use the prefix.
_KEY_PREFIX = "__distill_"
_ROW = _KEY_PREFIX + "row"
_STRING_FIELDS = (
    "request_id",
    "user_id",
    "tenant_id",
    "task",
    "model",
    "prompt_template_id",
    "prompt_template_version",
    "input",
    "response",
    "error",
)
#: Text fields that also take an integer column: ids and versions are often numbers in exports.
_ID_FIELDS = frozenset({"request_id", "user_id", "tenant_id", "prompt_template_version"})
_NUMBER_FIELDS = ("latency_ms", "cost_usd")
_OBJECT_FIELDS = ("params", "usage", "feedback")
_CONSTANT_FIELDS = frozenset(_STRING_FIELDS + _NUMBER_FIELDS + ("timestamp",) + _OBJECT_FIELDS) - {
    "request_id",
    "input",
}


class ImportMappingError(UsageError):
    """The mapping does not fit the source table (a missing column, a field with no source, a
    column of the wrong type)."""


class SourceTableError(UsageError):
    """The source file cannot be read as a table: an unknown extension, or bytes that do not parse."""


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column fills which log field.

    A field with no column takes its value from ``constants`` (``{"model": "openai/gpt-4"}``); a
    constant also fills the null cells of a mapped column. ``user_id`` defaults to "anonymous".
    ``request_id``: a column holding the id; else ``request_id_from`` names the columns whose
    values identify a call and are hashed into the id; else the id is a hash of the source name
    and the whole row, so identical rows collapse into one (counted as ``duplicate_row``).
    ``timestamp`` missing: every row gets the import's ``default_day`` at midnight UTC.
    ``params`` / ``usage``: object key -> column; null cells are left out of the object.
    ``prefixes``: field -> text put before each value from a column (``{"model": "openai/"}``).
    """

    input: str
    response: str
    request_id: str | None = None
    request_id_from: tuple[str, ...] = ()
    timestamp: str | None = None
    user_id: str | None = None
    model: str | None = None
    prompt_template_id: str | None = None
    prompt_template_version: str | None = None
    tenant_id: str | None = None
    task: str | None = None
    error: str | None = None
    latency_ms: str | None = None
    cost_usd: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    usage: Mapping[str, str] = field(default_factory=dict)
    prefixes: Mapping[str, str] = field(default_factory=dict)
    constants: Mapping[str, Any] = field(default_factory=dict)

    def column_for(self, log_field: str) -> str | None:
        value = getattr(self, log_field, None)
        return value if isinstance(value, str) else None

    def source_columns(self) -> list[str]:
        """Every source column the mapping reads."""
        names = [self.column_for(spec.name) for spec in SCHEMA_FIELDS]
        names += [*self.request_id_from, *self.params.values(), *self.usage.values()]
        return list(dict.fromkeys(name for name in names if name))


#: The log fields a source column can fill directly (``FIELD=COLUMN`` on the command line).
MAPPABLE_FIELDS = (
    "input",
    "response",
    "timestamp",
    *(f for f in _STRING_FIELDS if f not in ("input", "response")),
    *_NUMBER_FIELDS,
)


def mapping_from_options(columns: Sequence[str], constants: Sequence[str]) -> ColumnMapping:
    """A mapping from ``FIELD=COLUMN`` and ``FIELD=VALUE`` pairs, as the command line takes them.

    A constant for ``params``, ``usage`` or ``feedback`` is a JSON object. Every mistake (no
    ``=``, a field that does not exist, a field given twice) is refused with the fix.
    """
    fields = _pairs(columns, "--map", "FIELD=COLUMN", MAPPABLE_FIELDS)
    values: dict[str, Any] = _pairs(constants, "--constant", "FIELD=VALUE", sorted(_CONSTANT_FIELDS))
    missing = [name for name in ("input", "response") if name not in fields]
    if missing:
        raise ImportMappingError(
            f"no column for {' and '.join(missing)}: add --map {missing[0]}=<column> (or use --preset jigsaw)"
        )
    for name in _OBJECT_FIELDS:
        if name in values:
            try:
                values[name] = json.loads(values[name])
            except json.JSONDecodeError:
                values[name] = None
            if not isinstance(values[name], dict):
                raise ImportMappingError(f"--constant {name}=... must be a JSON object, e.g. {name}='{{\"key\": 1}}'")
    return ColumnMapping(**fields, constants=values)


def _pairs(items: Sequence[str], option: str, form: str, allowed: Sequence[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        name, equals, value = item.partition("=")
        name = name.strip()
        if not equals or not name:
            raise ImportMappingError(f"{option} {item!r} is not {form}: write e.g. {option} input=comment_text")
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ImportMappingError(
                f"{option} {item!r}: no log field {name!r}; {hint}the fields are {', '.join(allowed)}"
            )
        if name in pairs:
            raise ImportMappingError(f"{option} gives {name!r} twice ({pairs[name]!r} and {value!r}): keep one")
        pairs[name] = value
    return pairs


def jigsaw_mapping() -> ColumnMapping:
    """The mapping for the shared ``jigsaw/teacher_responses.parquet`` (real GPT-4/3.5 answers).

    ``id`` is the Kaggle comment id and is not unique per model and prompt (23 comments were
    answered twice), so the request id hashes (id, model, prompt, response). The table has no
    user ids; each comment's author is unknown, so the comment id stands in for the user: one
    shared constant would make a single "power user" that per-user caps would cut down. It has
    no timestamps either: pass ``default_day`` to :func:`import_table`.
    """
    return ColumnMapping(
        input="comment_text",
        response="raw_response",
        request_id_from=("id", "teacher_model", "prompt_id", "raw_response"),
        user_id="id",
        model="teacher_model",
        prompt_template_id="prompt_id",
        params={"temperature": "temperature"},
        prefixes={"model": "openai/", "user_id": "jigsaw-author-"},
    )


@dataclass(frozen=True)
class ImportSummary:
    """What an import read and wrote; ``rows_read == rows_written + rows_skipped`` always."""

    source: str
    source_sha256: str
    rows_read: int
    rows_written: int
    object_keys: tuple[str, ...]
    rows_per_day: dict[str, int]
    skipped: dict[str, int]
    # Up to five 0-based source row numbers per skip reason, to find the rows again.
    skipped_examples: dict[str, list[int]]
    # Objects an earlier import of the same table had written on days this one does not write.
    objects_removed: tuple[str, ...] = ()

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def objects_written(self) -> int:
        return len(self.object_keys)


def detect_format(path: str | Path, source_format: str | None = None) -> str:
    if source_format is not None:
        if source_format not in set(SOURCE_FORMATS.values()):
            raise ValueError(f"unknown source format {source_format!r}; use one of csv, parquet, jsonl")
        return source_format
    suffix = Path(path).suffix.lower()
    if suffix not in SOURCE_FORMATS:
        raise SourceTableError(
            f"cannot tell the format of {str(path)!r} from its extension {suffix or '(none)'!r}: "
            f"rename it to end in one of {', '.join(sorted(SOURCE_FORMATS))}"
        )
    return SOURCE_FORMATS[suffix]


def read_source_table(path: str | Path, source_format: str | None = None) -> pa.Table:
    """A CSV, Parquet or JSON-lines file as an Arrow table.

    CSV cells are read as text (type inference would turn an id ``0012`` into 12); only empty
    cells are null (a comment reading "NA" or "null" is a comment). Casting to the log's types
    happens in SQL. JSON means JSON lines, one object per line.
    """
    kind = detect_format(path, source_format)
    try:
        if kind == "parquet":
            return pq.read_table(path)
        if kind == "jsonl":
            return pa_json.read_json(path)
        with pa_csv.open_csv(path) as reader:
            names = reader.schema.names
        return pa_csv.read_csv(
            path,
            # Quoted cells may hold newlines (teacher answers do).
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), null_values=[""], strings_can_be_null=True
            ),
        )
    except pa.ArrowInvalid as exc:
        # Arrow says what it could not parse (and where); the whole message, on one line, is the diagnosis.
        problem = " ".join(str(exc).split())[:300]
        raise SourceTableError(f"{str(path)!r} is not a readable {kind} file: {problem}; fix or re-export it") from exc


def import_table(
    store: ObjectStore,
    source: str | Path,
    mapping: ColumnMapping,
    *,
    source_format: str | None = None,
    default_day: str | None = None,
    task: Task | None = None,
    source_name: str | None = None,
    max_records_per_object: int = DEFAULT_MAX_RECORDS_PER_OBJECT,
) -> ImportSummary:
    """Write the rows of ``source`` as log objects ``logs/dt=DAY/import-<stem>-<sha8>-<part>``.

    ``task`` fills the ``task`` field and each row's ``prompt_template_version`` (from the
    task's prompt of that id) where the mapping does not. ``source_name`` (default: the file
    name) goes into row-hash request ids. Objects of an earlier import of the same table that
    this import no longer writes (after a change of ``default_day`` or of
    ``max_records_per_object``) are deleted, on every day, and listed in the summary.
    """
    if max_records_per_object < 1:
        raise ValueError("max_records_per_object must be positive")
    path = Path(source)
    table = read_source_table(path, source_format)
    _check_mapping(mapping, table.schema, default_day)
    _check_column_types(mapping, table)
    source_sha = file_sha256(path)
    name = source_name or path.name
    object_stem = f"import-{re.sub(r'[^A-Za-z0-9._-]+', '_', path.stem)}-{source_sha[:8]}"

    plan = _plan_fields(mapping, table.schema, name, default_day, task)
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("source_rows", table.append_column(_ROW, pa.array(range(table.num_rows), pa.int64())))
        _check_numbers(con, mapping)
        # Pass 1, narrow: each row's request id, timestamp, day and skip reason.
        keys = con.sql(plan.keys_sql()).to_arrow_table()
        skipped, examples = {}, {}
        for reason, count, rows in con.execute(
            "SELECT skip_reason, count(*), list(row ORDER BY row)[1:5] FROM keys "
            "WHERE skip_reason IS NOT NULL GROUP BY skip_reason ORDER BY skip_reason"
        ).fetchall():
            skipped[reason] = int(count)
            examples[reason] = [int(r) for r in rows]
        # Pass 2, wide: the JSON lines of the kept rows, in source order (no ORDER BY: DuckDB keeps
        # insertion order, and sorting would drag the wide rows through the sort).
        with_keys = table.append_column(_ROW, keys.column("row"))
        for column in ("request_id", "timestamp", "day"):
            with_keys = with_keys.append_column(_KEY_PREFIX + column, keys.column(column))
        with_keys = with_keys.append_column(_KEY_PREFIX + "keep", pc.is_null(keys.column("skip_reason")))
        con.register("source_rows", with_keys)
        written = con.sql(plan.lines_sql()).to_arrow_table()
    finally:
        con.close()

    rows = written.column("row").to_numpy()
    days = written.column("day")
    if np.any(np.diff(rows) <= 0) or (len(days) > 1 and pc.any(pc.less(days[1:], days[:-1])).as_py()):
        written = written.take(pc.sort_indices(written, [("day", "ascending"), ("row", "ascending")]))
    lines = written.column("line")
    keys_written, rows_per_day, start = [], {}, 0
    for entry in pc.value_counts(written.column("day")).to_pylist():
        day, count = entry["values"], entry["counts"]
        sizes = [min(max_records_per_object, count - offset) for offset in range(0, count, max_records_per_object)]
        keys_written += publish_day_objects(store, day, object_stem, object_payloads(lines.slice(start, count), sizes))
        rows_per_day[day] = count
        start += count
    # Only once the new objects are all written: a crash in between leaves rows twice, never none.
    removed = remove_earlier_import_objects(store, object_stem, set(keys_written))

    return ImportSummary(
        source=str(path),
        source_sha256=source_sha,
        rows_read=table.num_rows,
        rows_written=written.num_rows,
        object_keys=tuple(keys_written),
        rows_per_day=rows_per_day,
        skipped=skipped,
        skipped_examples=examples,
        objects_removed=tuple(removed),
    )


def remove_earlier_import_objects(store: ObjectStore, name_stem: str, written: set[str]) -> list[str]:
    """Delete the objects ``<name_stem>-<part>`` of every day that are not in ``written``.

    ``name_stem`` names one table (its file name and hash), so these are what an earlier import
    of the same table wrote on days (or in parts) this one did not: left in place, each of their
    request ids would be on two days. Lists every log object once; imports are rare.
    """
    pattern = re.compile(rf"{re.escape(LOG_PREFIX)}/dt=[^/]+/{re.escape(name_stem)}-\d{{5}}\.jsonl")
    stale = [
        info.key for info in store.list(f"{LOG_PREFIX}/") if pattern.fullmatch(info.key) and info.key not in written
    ]
    for key in stale:
        store.delete(key)
    return stale


def publish_day_objects(store: ObjectStore, day: str, name_stem: str, payloads: list[bytes]) -> list[str]:
    """Write ``payloads`` as ``<name_stem>-<part>`` objects of one day; delete stale higher parts."""
    keys = [log_object_key(day, f"{name_stem}-{part:05d}") for part in range(len(payloads))]
    for key, payload in zip(keys, payloads, strict=True):
        store.put_bytes(key, payload)
    written = set(keys)
    for info in store.list(f"{log_object_prefix(day)}{name_stem}-"):
        if info.key not in written:
            store.delete(info.key)
    return keys


def object_payloads(lines: pa.Array | pa.ChunkedArray, sizes: Sequence[int]) -> list[bytes]:
    """The bytes of consecutive log objects holding ``sizes`` lines each.

    ``lines`` holds newline-terminated JSON lines (string or binary), so an object is a run of
    the arrays' data buffers: the bytes :func:`encode_log_object` would give, without a Python
    string per line.
    """
    pieces: list[tuple[pa.Buffer, np.ndarray]] = []
    for chunk in lines.chunks if isinstance(lines, pa.ChunkedArray) else [lines]:
        offset_type = (
            np.int64 if pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type) else np.int32
        )
        _validity, offsets_buffer, data = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        pieces.append((data, offsets))
    payloads, chunk_index, line_in_chunk = [], 0, 0
    for size in sizes:
        parts, left = [], size
        while left > 0:
            data, offsets = pieces[chunk_index]
            take = min(left, len(offsets) - 1 - line_in_chunk)
            start, end = int(offsets[line_in_chunk]), int(offsets[line_in_chunk + take])
            parts.append(data.slice(start, end - start).to_pybytes())
            left -= take
            line_in_chunk += take
            if line_in_chunk == len(offsets) - 1:
                chunk_index, line_in_chunk = chunk_index + 1, 0
        payloads.append(b"".join(parts))
    return payloads


def log_line_sql(expressions: Mapping[str, str]) -> str:
    """A DuckDB expression rendering one log record as a JSON line, fields in schema order.

    ``expressions`` maps a log field to a SQL expression of its JSON type; fields not named are
    written as null, the way :meth:`LogRecord.to_json` writes them.
    """
    unknown = set(expressions) - {spec.name for spec in SCHEMA_FIELDS}
    if unknown:
        raise ValueError(f"not log fields: {sorted(unknown)}")
    parts = [f"{spec.name} := {expressions.get(spec.name, 'NULL')}" for spec in SCHEMA_FIELDS]
    return f"to_json(struct_pack({', '.join(parts)}))"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, Mapping):
        return f"{_literal(json.dumps(value, sort_keys=True))}::JSON"
    raise ImportMappingError(f"unsupported constant {value!r}")


def _check_mapping(mapping: ColumnMapping, schema: pa.Schema, default_day: str | None) -> None:
    missing = [name for name in mapping.source_columns() if name not in schema.names]
    if missing:
        raise ImportMappingError(
            f"mapping names column(s) {missing} that the source does not have; its columns are {schema.names}"
        )
    reserved = [name for name in schema.names if name.startswith(_KEY_PREFIX)]
    if reserved:
        raise ImportMappingError(
            f"source column(s) {reserved} use the prefix {_KEY_PREFIX!r}, which the importer reserves"
        )
    bad_constants = sorted(set(mapping.constants) - _CONSTANT_FIELDS)
    if bad_constants:
        raise ImportMappingError(f"constants for {bad_constants} are not allowed; allowed: {sorted(_CONSTANT_FIELDS)}")
    bad_prefixes = sorted(set(mapping.prefixes) - set(_STRING_FIELDS))
    if bad_prefixes:
        raise ImportMappingError(f"prefixes only apply to text fields, not {bad_prefixes}")
    for name in ("model", "prompt_template_id"):
        if mapping.column_for(name) is None and not mapping.constants.get(name):
            raise ImportMappingError(f"the log field {name!r} needs a column or a constant")
    if mapping.request_id and mapping.request_id_from:
        raise ImportMappingError("give request_id or request_id_from, not both")
    if mapping.timestamp is not None:
        column_type = schema.field(mapping.timestamp).type
        if not (
            pa.types.is_timestamp(column_type)
            or pa.types.is_date(column_type)
            or pa.types.is_string(column_type)
            or pa.types.is_large_string(column_type)
        ):
            raise ImportMappingError(
                f"timestamp column {mapping.timestamp!r} has type {column_type}; "
                "use a timestamp, a date or ISO-8601 text"
            )
    elif "timestamp" in mapping.constants:
        try:
            day_of(str(mapping.constants["timestamp"]))
        except ValueError:
            raise ImportMappingError(
                f"the timestamp constant {mapping.constants['timestamp']!r} is not an ISO 8601 time, "
                "e.g. 2024-01-15T00:00:00Z"
            ) from None
    elif default_day is None:
        raise ImportMappingError("the mapping has no timestamp column or constant; pass default_day (--day)")
    else:
        try:
            dt.date.fromisoformat(default_day)
        except ValueError:
            raise ImportMappingError(f"the day {default_day!r} is not a date: write it as YYYY-MM-DD") from None
    for name in _NUMBER_FIELDS:
        constant = mapping.constants.get(name)
        if constant is not None and not _is_finite_number(constant):
            raise ImportMappingError(f"the {name} constant {constant!r} is not a finite number")


def _is_finite_number(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _is_text(column_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(column_type):
        return _is_text(column_type.value_type)
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type)


def _is_number(column_type: pa.DataType) -> bool:
    return pa.types.is_integer(column_type) or pa.types.is_floating(column_type) or pa.types.is_decimal(column_type)


def _check_column_types(mapping: ColumnMapping, table: pa.Table) -> None:
    """Refuse a mapped column whose type is not its field's: a boolean or a list cast to text
    would read as ``"true"`` or ``"[1]"``, and a parser would find a label in either."""
    for name in (*_STRING_FIELDS, *_NUMBER_FIELDS):
        column = mapping.column_for(name)
        if column is None:
            continue
        column_type = table.schema.field(column).type
        if name in _NUMBER_FIELDS:
            # A text column (every CSV column) is checked value by value: see _check_numbers.
            fits, wanted = _is_number(column_type) or _is_text(column_type), "numbers"
        else:
            fits = _is_text(column_type) or (name in _ID_FIELDS and pa.types.is_integer(column_type))
            wanted = "text or integers" if name in _ID_FIELDS else "text"
        valid = pc.is_valid(table.column(column))
        if not fits and pc.any(valid).as_py():
            row = pc.index(valid, True).as_py()
            first = table.column(column)[row].as_py()
            raise _bad_column(column, name, f"{column_type} values (the first at row {row}: {first!r:.60})", wanted)


def _check_numbers(con: duckdb.DuckDBPyConnection, mapping: ColumnMapping) -> None:
    """Refuse a number column holding text that is not a number, or an infinity; NaN is how
    pandas writes a missing number, so it stays a missing value."""
    for name in _NUMBER_FIELDS:
        column = mapping.column_for(name)
        if column is None:
            continue
        number = f"TRY_CAST({_quote(column)} AS DOUBLE)"
        bad = con.execute(
            f"SELECT {_ROW}, {_quote(column)} FROM source_rows WHERE {_quote(column)} IS NOT NULL "
            f"AND NOT coalesce(isfinite({number}) OR isnan({number}), false) ORDER BY {_ROW} LIMIT 1"
        ).fetchone()
        if bad is not None:
            raise _bad_column(column, name, f"{bad[1]!r:.60} at row {bad[0]}", "finite numbers")


def _bad_column(column: str, log_field: str, found: str, wanted: str) -> ImportMappingError:
    return ImportMappingError(
        f"column {column!r} (mapped to {log_field}) holds {found}, but {log_field} takes {wanted}: "
        "convert the column or map another one"
    )


@dataclass(frozen=True)
class _FieldPlan:
    """SQL for each log field, and the two passes of an import built from it."""

    fields: dict[str, str]
    parsed_timestamp: str
    timestamp_given: str
    duplicate_reason: str

    def keys_sql(self) -> str:
        f = self.fields
        return f"""
            WITH keyed AS (
                SELECT {_ROW} AS row, {f["request_id"]} AS request_id,
                    {self.parsed_timestamp} AS parsed_timestamp, {self.timestamp_given} AS timestamp_given,
                    {f["input"]} IS NULL AS no_input, {f["model"]} IS NULL AS no_model,
                    {f["prompt_template_id"]} IS NULL AS no_prompt_template_id
                FROM source_rows
            ),
            checked AS (
                SELECT row, request_id,
                    strftime(parsed_timestamp, '%Y-%m-%dT%H:%M:%S.%gZ') AS timestamp,
                    strftime(parsed_timestamp, '%Y-%m-%d') AS day,
                    CASE
                        WHEN no_input THEN 'null_input'
                        WHEN request_id IS NULL THEN 'null_request_id'
                        WHEN length(request_id) > {MAX_REQUEST_ID_CHARS} THEN 'request_id_too_long'
                        WHEN NOT timestamp_given THEN 'null_timestamp'
                        WHEN parsed_timestamp IS NULL THEN 'unparseable_timestamp'
                        WHEN no_model THEN 'null_model'
                        WHEN no_prompt_template_id THEN 'null_prompt_template_id'
                    END AS early_reason
                FROM keyed
            )
            SELECT row, request_id, timestamp, day,
                CASE
                    WHEN early_reason IS NOT NULL THEN early_reason
                    WHEN row_number() OVER (PARTITION BY early_reason IS NULL, request_id ORDER BY row) > 1
                        THEN '{self.duplicate_reason}'
                END AS skip_reason
            FROM checked
            ORDER BY row
        """

    def lines_sql(self) -> str:
        fields = {
            **self.fields,
            "request_id": _KEY_PREFIX + "request_id",
            "timestamp": _KEY_PREFIX + "timestamp",
        }
        return f"""
            SELECT {_ROW} AS row, {_KEY_PREFIX}day AS day, {log_line_sql(fields)} || chr(10) AS line
            FROM source_rows
            WHERE {_KEY_PREFIX}keep
        """


def _plan_fields(
    mapping: ColumnMapping, schema: pa.Schema, source_name: str, default_day: str | None, task: Task | None
) -> _FieldPlan:
    """SQL expressions over the source columns for every log field."""
    constants = dict(mapping.constants)
    if task is not None:
        constants.setdefault("task", task.id)
    fields: dict[str, str] = {"schema_version": str(SCHEMA_VERSION)}

    constants.setdefault("user_id", DEFAULT_USER_ID)

    for name in _STRING_FIELDS:
        column = mapping.column_for(name)
        constant = f"CAST({_literal(constants.get(name))} AS VARCHAR)"
        if column is not None:
            prefix = mapping.prefixes.get(name, "")
            value = f"CAST({_quote(column)} AS VARCHAR)"
            fields[name] = f"coalesce({_literal(prefix) + ' || ' if prefix else ''}{value}, {constant})"
        else:
            fields[name] = constant
    if (
        task is not None
        and mapping.column_for("prompt_template_version") is None
        and "prompt_template_version" not in constants
    ):
        cases = " ".join(f"WHEN {_literal(p.id)} THEN {_literal(p.version)}" for p in task.prompts.values())
        fields["prompt_template_version"] = f"CASE {fields['prompt_template_id']} {cases} END" if cases else "NULL"

    for name in _NUMBER_FIELDS:
        column = mapping.column_for(name)
        value = f"CAST({_literal(constants.get(name))} AS DOUBLE)"
        if column is not None:
            value = f"coalesce(CAST({_quote(column)} AS DOUBLE), {value})"
        # DuckDB writes NaN and inf as bare words, which are not JSON.
        fields[name] = f"CASE WHEN isfinite({value}) THEN {value} END"

    for name in ("params", "usage"):
        from_columns: Mapping[str, str] = getattr(mapping, name)
        constant = constants.get(name)
        base = _literal(constant) if constant is not None else "'{}'::JSON"
        if from_columns:
            pairs = ", ".join(f"{_literal(key)}, {_quote(column)}" for key, column in from_columns.items())
            # A merge patch drops the keys whose value is null.
            merged = f"json_merge_patch({base}, json_merge_patch('{{}}', json_object({pairs})))"
            # Parameters default to {} (as in LogRecord); usage with no counts at all is null.
            fields[name] = merged if name == "params" else f"nullif({merged}, '{{}}'::JSON)"
        else:
            fields[name] = base if constant is not None else "NULL::JSON"
    fields["feedback"] = _literal(constants["feedback"]) if constants.get("feedback") is not None else "NULL::JSON"

    if mapping.request_id is not None:
        duplicate_reason = "duplicate_request_id"
    elif mapping.request_id_from:
        key = ", ".join(_quote(c) for c in mapping.request_id_from)
        fields["request_id"] = f"left(sha256(CAST(json_array({key}) AS VARCHAR)), 32)"
        duplicate_reason = "duplicate_request_id"
    else:
        all_columns = ", ".join(f"{_literal(n)}, {_quote(n)}" for n in schema.names)
        fields["request_id"] = (
            f"left(sha256({_literal(source_name)} || chr(10) || CAST(json_object({all_columns}) AS VARCHAR)), 32)"
        )
        duplicate_reason = "duplicate_row"

    if mapping.timestamp is not None:
        raw = _quote(mapping.timestamp)
        parsed = f"TRY_CAST({raw} AS TIMESTAMPTZ)"
        timestamp_given = f"{raw} IS NOT NULL"
    else:
        parsed = f"CAST({_literal(constants.get('timestamp') or f'{default_day}T00:00:00Z')} AS TIMESTAMPTZ)"
        timestamp_given = "true"
    fields["timestamp"] = "NULL"  # from the first pass
    return _FieldPlan(fields, parsed, timestamp_given, duplicate_reason)
