"""Ingestion of log objects: split into lines, validate every line, quarantine the bad ones.

Every line that comes in leaves as exactly one of: a kept record, or a quarantined line with
its object key, line number and reason (a duplicate request id is quarantined too, with the
location of its first occurrence). So ``lines_in == kept + quarantined`` always holds.

The work is vectorised: numpy finds line boundaries, Arrow wraps them without copying, and
DuckDB validates and types every field in one SQL pass per object, from ``SCHEMA_FIELDS``.
Objects are processed one at a time into an on-disk DuckDB database, so memory is bounded by
the largest object plus DuckDB's memory limit, not by the day's volume.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from distill_pipeline import duck
from distill_pipeline.logschema import MAX_REQUEST_ID_CHARS, SCHEMA_FIELDS, SUPPORTED_SCHEMA_VERSIONS, FieldSpec
from distill_pipeline.store import ObjectStore

#: Lines longer than this are quarantined without being parsed.
DEFAULT_MAX_LINE_BYTES = 1_000_000
#: How much of a bad line the quarantine table keeps.
EXCERPT_CHARS = 300

_JSON_TYPES = {
    "string": ("VARCHAR",),
    "integer": ("BIGINT", "UBIGINT"),
    "number": ("BIGINT", "UBIGINT", "DOUBLE"),
    "object": ("OBJECT",),
}

RECORD_COLUMNS = (
    "request_id",
    "timestamp",
    "day",
    "user_id",
    "tenant_id",
    "task",
    "model",
    "params",
    "prompt_template_id",
    "prompt_template_version",
    "input",
    "response",
    "usage",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "cost_usd",
    "error",
    "feedback",
    "schema_version",
    "source_key",
    "source_line",
)


@dataclass
class IngestStats:
    objects: int = 0
    bytes_in: int = 0
    lines_in: int = 0
    kept: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return self.reasons.get("duplicate request_id", 0)

    @property
    def invalid(self) -> int:
        return self.quarantined - self.duplicates


@dataclass
class LineBatch:
    """The lines of one object as Arrow arrays (line text is zero-copy over the object's bytes)."""

    lines: pa.Array  # large_string; invalid UTF-8 lines are empty here and flagged
    nbytes: pa.Array  # int64, each line's length in bytes as written
    utf8_ok: pa.Array  # bool
    raw_excerpts: dict[int, str]  # line index -> printable excerpt, for lines Arrow could not hold


def split_lines(data: bytes) -> LineBatch:
    """Split an object's bytes at newlines; a trailing newline does not start another line."""
    if not data:
        return LineBatch(pa.array([], pa.large_string()), pa.array([], pa.int64()), pa.array([], pa.bool_()), {})
    buffer = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buffer == 10)
    starts = np.empty(len(newlines) + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = newlines + 1
    count = len(starts) - 1 if starts[-1] == len(data) else len(starts)
    offsets = np.empty(count + 1, dtype=np.int64)
    offsets[:count] = starts[:count]
    offsets[count] = len(data)
    # Each line keeps its trailing newline: JSON allows trailing whitespace, and slicing it
    # off would mean copying every line.
    lines = pa.Array.from_buffers(pa.large_string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    nbytes = pa.array(np.diff(offsets))
    try:
        data.decode("utf-8")
        return LineBatch(lines, nbytes, pa.array(np.ones(count, dtype=bool)), {})
    except UnicodeDecodeError:
        texts, ok, excerpts = _decode_lines_one_by_one(data, offsets, count)
        return LineBatch(pa.array(texts, pa.large_string()), nbytes, pa.array(ok), excerpts)


def _decode_lines_one_by_one(
    data: bytes, offsets: np.ndarray, count: int
) -> tuple[list[str], np.ndarray, dict[int, str]]:
    # The rare slow path: decode line by line and blank out the lines that are not UTF-8.
    texts: list[str] = []
    ok = np.ones(count, dtype=bool)
    excerpts: dict[int, str] = {}
    for index in range(count):
        raw = data[offsets[index] : offsets[index + 1]]
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            texts.append("")
            ok[index] = False
            excerpts[index] = f"byte {exc.start}: " + raw[:EXCERPT_CHARS].decode("utf-8", "backslashreplace")
    return texts, ok, excerpts


def decompress_if_needed(key: str, data: bytes) -> bytes:
    if key.endswith(".gz"):
        return gzip.decompress(data)
    return data


def _field_checks(paths: str) -> tuple[str, str]:
    """SQL for the per-field type checks: (the json_type list expression, the CASE branches)."""
    types_expr = f"json_type(doc, [{paths}])"
    branches = []
    for index, spec in enumerate(SCHEMA_FIELDS, start=1):
        allowed = ", ".join(f"'{t}'" for t in _JSON_TYPES[spec.json_type])
        if spec.required:
            branches.append(
                f"WHEN types[{index}] IS NULL OR types[{index}] = 'NULL' THEN 'missing required field {spec.name}'"
            )
        branches.append(
            f"WHEN types[{index}] IS NOT NULL AND types[{index}] <> 'NULL' AND types[{index}] NOT IN ({allowed}) "
            f"THEN 'field {spec.name} must be {_article(spec)} {spec.json_type}, not ' || lower(types[{index}])"
        )
    return types_expr, "\n".join(branches)


def _article(spec: FieldSpec) -> str:
    return "an" if spec.json_type[0] in "aeiou" else "a"


def _validation_sql(max_line_bytes: int) -> str:
    paths = ", ".join(f"'$.{spec.name}'" for spec in SCHEMA_FIELDS)
    position = {spec.name: index for index, spec in enumerate(SCHEMA_FIELDS, start=1)}
    types_expr, type_branches = _field_checks(paths)
    versions = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)

    def value(name: str) -> str:
        return f"vals[{position[name]}]"

    return f"""
    WITH sized AS (
        SELECT * FROM batch
    ), parsed AS (
        SELECT *,
            -- TRY_CAST rather than json_valid: DuckDB may evaluate json functions on every row
            -- whatever a CASE says, and they raise on malformed input.
            TRY_CAST(CASE WHEN utf8_ok AND nbytes <= {max_line_bytes} THEN line END AS JSON) AS doc
        FROM sized
    ), typed AS (
        SELECT *,
            CASE WHEN json_type(doc) = 'OBJECT' THEN {types_expr} END AS types,
            CASE WHEN json_type(doc) = 'OBJECT' THEN json_extract_string(doc, [{paths}]) END AS vals
        FROM parsed
    ), judged AS (
        SELECT *,
            CASE
                WHEN NOT utf8_ok THEN 'invalid UTF-8'
                WHEN nbytes > {max_line_bytes} THEN 'line longer than {max_line_bytes} bytes'
                WHEN trim(line, ' ' || chr(9) || chr(10) || chr(13)) = '' THEN 'blank line'
                WHEN doc IS NULL THEN 'not valid JSON'
                WHEN types IS NULL THEN 'not a JSON object'
                {type_branches}
                WHEN TRY_CAST({value("schema_version")} AS BIGINT) NOT IN ({versions})
                    THEN 'unsupported schema_version ' || {value("schema_version")}
                WHEN regexp_full_match({value("request_id")}, '[\\s\\p{{Z}}]*') THEN 'empty request_id'
                WHEN length({value("request_id")}) > {MAX_REQUEST_ID_CHARS} THEN 'request_id longer than {MAX_REQUEST_ID_CHARS} characters'
                WHEN TRY_CAST({value("timestamp")} AS TIMESTAMPTZ) IS NULL THEN 'timestamp is not ISO 8601'
                WHEN regexp_full_match({value("input")}, '[\\s\\p{{Z}}]*') THEN 'empty input'
                WHEN {value("response")} IS NULL AND {value("error")} IS NULL THEN 'neither response nor error'
            END AS reason
        FROM typed
    )
    SELECT * FROM judged
    """


def _records_sql(source_key: str) -> str:
    position = {spec.name: index for index, spec in enumerate(SCHEMA_FIELDS, start=1)}

    def value(name: str) -> str:
        return f"vals[{position[name]}]"

    key = duck.sql_string(source_key)
    return f"""
    SELECT
        {value("request_id")} AS request_id,
        CAST({value("timestamp")} AS TIMESTAMPTZ) AS timestamp,
        CAST(CAST({value("timestamp")} AS TIMESTAMPTZ) AS DATE) AS day,
        {value("user_id")} AS user_id,
        {value("tenant_id")} AS tenant_id,
        {value("task")} AS task,
        {value("model")} AS model,
        {value("params")} AS params,
        {value("prompt_template_id")} AS prompt_template_id,
        {value("prompt_template_version")} AS prompt_template_version,
        {value("input")} AS input,
        {value("response")} AS response,
        {value("usage")} AS usage,
        TRY_CAST(json_extract_string({value("usage")}, '$.prompt_tokens') AS BIGINT) AS prompt_tokens,
        TRY_CAST(json_extract_string({value("usage")}, '$.completion_tokens') AS BIGINT) AS completion_tokens,
        CAST({value("latency_ms")} AS DOUBLE) AS latency_ms,
        CAST({value("cost_usd")} AS DOUBLE) AS cost_usd,
        {value("error")} AS error,
        {value("feedback")} AS feedback,
        CAST({value("schema_version")} AS INTEGER) AS schema_version,
        {key} AS source_key,
        line_no AS source_line
    FROM judged_batch WHERE reason IS NULL
    """


def _quarantine_sql(source_key: str) -> str:
    key = duck.sql_string(source_key)
    position = {spec.name: index for index, spec in enumerate(SCHEMA_FIELDS, start=1)}
    return f"""
    SELECT
        {key} AS source_key,
        line_no AS source_line,
        reason,
        CASE WHEN types IS NOT NULL AND types[{position["request_id"]}] = 'VARCHAR'
             THEN left(vals[{position["request_id"]}], {MAX_REQUEST_ID_CHARS}) END AS request_id,
        nbytes AS line_bytes,
        CASE WHEN utf8_ok THEN left(rtrim(line, chr(10) || chr(13)), {EXCERPT_CHARS}) ELSE excerpt END AS excerpt
    FROM judged_batch WHERE reason IS NOT NULL
    """


QUARANTINE_COLUMNS = ("source_key", "source_line", "reason", "request_id", "line_bytes", "excerpt")


class Ingestor:
    """Accumulates validated records and quarantined lines of many objects, then deduplicates.

    Use: ``add_object`` for each object, then ``finish`` to write two Parquet files.
    """

    def __init__(self, workdir: Path, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.workdir = workdir
        self.max_line_bytes = max_line_bytes
        self.con = duck.connect(workdir)
        self.stats = IngestStats()
        self._validation_sql = _validation_sql(max_line_bytes)
        # Typed empty tables, shaped by the same SELECTs that fill them.
        self._judge(
            pa.table(
                {
                    "line_no": pa.array([], pa.int64()),
                    "line": pa.array([], pa.large_string()),
                    "nbytes": pa.array([], pa.int64()),
                    "utf8_ok": pa.array([], pa.bool_()),
                    "excerpt": pa.array([], pa.string()),
                }
            )
        )
        self.con.execute(f"CREATE TABLE records AS {_records_sql('')}")
        self.con.execute(f"CREATE TABLE quarantine AS {_quarantine_sql('')}")

    def _judge(self, batch: pa.Table) -> None:
        self.con.register("batch", batch)
        try:
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE judged_batch AS {self._validation_sql}")
        finally:
            self.con.unregister("batch")

    def add_object(self, key: str, data: bytes) -> None:
        self.stats.objects += 1
        self.stats.bytes_in += len(data)
        try:
            data = decompress_if_needed(key, data)
        except (OSError, EOFError, zlib.error) as exc:
            self._quarantine_object(key, f"object could not be decompressed: {exc}")
            return
        batch = split_lines(data)
        count = len(batch.lines)
        if count == 0:
            return
        excerpts = (
            pa.array([batch.raw_excerpts.get(i) for i in range(count)], pa.string())
            if batch.raw_excerpts
            else pa.nulls(count, pa.string())
        )
        line_numbers = pa.array(np.arange(1, count + 1, dtype=np.int64))
        self._judge(
            pa.table(
                {
                    "line_no": line_numbers,
                    "line": batch.lines,
                    "nbytes": batch.nbytes,
                    "utf8_ok": batch.utf8_ok,
                    "excerpt": excerpts,
                }
            )
        )
        self.con.execute(f"INSERT INTO records {_records_sql(key)}")
        self.con.execute(f"INSERT INTO quarantine {_quarantine_sql(key)}")
        self.stats.lines_in += count

    def _quarantine_object(self, key: str, reason: str) -> None:
        # The object's lines cannot be counted, so the object itself is the unit quarantined.
        self.stats.lines_in += 1
        self.con.execute("INSERT INTO quarantine VALUES (?, 0, ?, NULL, NULL, NULL)", [key, reason])

    def finish(self, records_path: Path, quarantine_path: Path) -> IngestStats:
        """Deduplicate by request id (first occurrence wins) and write both tables as Parquet."""
        self.con.execute(
            """
            CREATE TEMP TABLE ranked AS
            SELECT *, row_number() OVER (PARTITION BY request_id ORDER BY source_key, source_line) AS occurrence,
                   first_value(source_key || ':' || source_line) OVER (
                       PARTITION BY request_id ORDER BY source_key, source_line) AS first_seen
            FROM records
            """
        )
        self.con.execute(
            """
            INSERT INTO quarantine
            SELECT source_key, source_line, 'duplicate request_id', request_id,
                   strlen(input), 'first seen at ' || first_seen
            FROM ranked WHERE occurrence > 1
            """
        )
        columns = ", ".join(RECORD_COLUMNS)
        duck.copy_to_parquet(
            self.con,
            f"SELECT {columns} FROM ranked WHERE occurrence = 1 ORDER BY source_key, source_line",
            records_path,
        )
        duck.copy_to_parquet(self.con, "SELECT * FROM quarantine ORDER BY source_key, source_line", quarantine_path)
        self.stats.kept = self.con.execute("SELECT count(*) FROM ranked WHERE occurrence = 1").fetchone()[0]
        self.stats.reasons = dict(
            self.con.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY 2 DESC").fetchall()
        )
        self.stats.quarantined = sum(self.stats.reasons.values())
        if self.stats.kept + self.stats.quarantined != self.stats.lines_in:
            raise AssertionError(
                f"ingest accounting broken: {self.stats.lines_in} lines in, {self.stats.kept} kept, "
                f"{self.stats.quarantined} quarantined"
            )
        self.con.close()
        return self.stats


def ingest_objects(
    store: ObjectStore,
    keys: Iterable[str],
    workdir: Path,
    records_path: Path,
    quarantine_path: Path,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> IngestStats:
    """Validate the log objects at ``keys`` into a records table and a quarantine table."""
    ingestor = Ingestor(workdir, max_line_bytes=max_line_bytes)
    for key in sorted(keys):
        ingestor.add_object(key, store.get_bytes(key))
    return ingestor.finish(records_path, quarantine_path)
