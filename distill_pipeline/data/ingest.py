"""Ingestion of log objects: split into lines, validate every line, quarantine the bad ones.

Every line that comes in leaves as exactly one of: a kept record, or a quarantined line with
its object key, line number and reason (a duplicate request id is quarantined too, with the
location of its first occurrence). So ``lines_in == kept + quarantined`` always holds. An
object that cannot be read safely (a key the store refuses, more than ``max_object_bytes`` as
stored or once gunzipped, a corrupt gzip) is quarantined whole as one line, line 0, and the rest
of the day ingests.

The work is vectorised: numpy finds line boundaries, Arrow wraps them without copying, and
DuckDB validates and types every field in one SQL pass per batch of objects, from
``SCHEMA_FIELDS``. Batches are about ``BATCH_BYTES`` and DuckDB spills to the workdir past its
memory limit, so memory is bounded by a batch plus that limit, not by the day's volume.
"""

from __future__ import annotations

import codecs
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from distill_pipeline.core import duck
from distill_pipeline.core.store import ObjectStore, ObjectTooLarge, UnsafeKey
from distill_pipeline.core.task import CheckConfig
from distill_pipeline.data import pii
from distill_pipeline.logs.schema import (
    CALL_KINDS,
    MAX_REQUEST_ID_CHARS,
    ROLLOUT_MODES,
    SCHEMA_FIELDS,
    SERVED_BY,
    SUPPORTED_SCHEMA_VERSIONS,
    FieldSpec,
)

#: Lines longer than this are quarantined without being parsed.
DEFAULT_MAX_LINE_BYTES = 1_000_000
#: Objects holding more bytes than this, as stored or once gunzipped, are quarantined whole; the
#: raw_logs asset takes it from the task's ``[checks] max_log_object_bytes``.
DEFAULT_MAX_OBJECT_BYTES = CheckConfig.max_log_object_bytes
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
    "served_by",
    "rollout",
    "call_kind",
    "student",
    "label_distribution",
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
    #: PII items replaced by kind, when scrubbing was asked for (see ``pii.py``).
    pii_scrubbed: dict[str, int] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return self.reasons.get(DUPLICATE_REASON, 0)

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
        # ASCII is UTF-8, and asking that is much cheaper than decoding.
        if not data.isascii():
            data.decode("utf-8")
        return LineBatch(lines, nbytes, pa.array(np.ones(count, dtype=bool)), {})
    except UnicodeDecodeError:
        ok, excerpts = _find_invalid_lines(data, offsets)
        return LineBatch(_without_lines(data, offsets, ok), nbytes, pa.array(ok), excerpts)


def _find_invalid_lines(data: bytes, offsets: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """The rare slow path: which lines are not UTF-8, and an excerpt of each.

    A newline is never part of a multi-byte sequence, so decoding from a line's start fails
    first inside the first bad line at or after it; going on from the line after that one
    decodes the object about once, however many of its lines are bad.
    """
    ok = np.ones(len(offsets) - 1, dtype=bool)
    excerpts: dict[int, str] = {}
    view = memoryview(data)
    start = 0
    while start < len(data):
        try:
            codecs.utf_8_decode(view[start:], "strict", True)
            break
        except UnicodeDecodeError as exc:
            index = int(np.searchsorted(offsets, start + exc.start, side="right")) - 1
        raw = data[offsets[index] : offsets[index + 1]]
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            ok[index] = False
            excerpts[index] = f"byte {exc.start}: " + raw[:EXCERPT_CHARS].decode("utf-8", "backslashreplace")
        start = int(offsets[index + 1])
    return ok, excerpts


def _without_lines(data: bytes, offsets: np.ndarray, keep: np.ndarray) -> pa.Array:
    """The lines as a string array, those not kept as empty strings (one copy of the rest)."""
    lengths = np.where(keep, np.diff(offsets), 0)
    new_offsets = np.zeros(len(offsets), dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # The runs of kept lines between the bad ones are copied whole.
    bad = np.flatnonzero(~keep)
    run_starts = np.concatenate([[0], bad + 1]).tolist()
    run_ends = np.concatenate([bad, [len(keep)]]).tolist()
    text = b"".join(data[offsets[a] : offsets[b]] for a, b in zip(run_starts, run_ends, strict=True) if b > a)
    return pa.Array.from_buffers(pa.large_string(), len(keep), [None, pa.py_buffer(new_offsets), pa.py_buffer(text)])


def decompress_if_needed(key: str, data: bytes, max_bytes: int) -> bytes:
    """An object's content: its bytes, gunzipped when its key ends in ``.gz``.

    Raises :class:`ObjectTooLarge` as soon as the content passes ``max_bytes``, so a gzip bomb is
    never expanded whole; written out because ``gzip.decompress`` has no limit. Like it, this
    reads concatenated members and ignores zero padding after the last; zlib checks each
    member's header, CRC and length.
    """
    if not key.endswith(".gz"):
        return data
    members, room, rest = [], max_bytes, data
    while rest:
        member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        content = member.decompress(rest, room + 1)
        if len(content) > room:
            raise ObjectTooLarge(key, max_bytes)
        if not member.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        members.append(content)
        room -= len(content)
        rest = member.unused_data.lstrip(b"\0")
    return b"".join(members)


def _enum_checks(value: Callable[[str], str]) -> str:
    """SQL CASE branches quarantining a serving field whose value is not one the schema names."""
    branches = []
    for name, allowed in (("served_by", SERVED_BY), ("rollout", ROLLOUT_MODES), ("call_kind", CALL_KINDS)):
        # Not an IN list: DuckDB plans a long one as a join, and a join does not keep the lines
        # in order (``Ingestor.finish`` relies on that order).
        unlisted = " AND ".join(f"{value(name)} <> '{v}'" for v in allowed)
        branches.append(
            f"WHEN {value(name)} IS NOT NULL AND {unlisted} "
            f"THEN 'field {name} must be one of {', '.join(allowed)}, not ' || left({value(name)}, 40)"
        )
    return "\n".join(branches)


def _too_large(max_bytes: int) -> str:
    return f"object larger than {max_bytes} bytes"


def _field_checks() -> str:
    """SQL for the per-field type checks, as CASE branches over ``types``: the type of the
    root at 1, then each field's in schema order (and over ``vals`` for the value of a number)."""
    branches = []
    for index, spec in enumerate(SCHEMA_FIELDS, start=2):
        allowed = ", ".join(f"'{t}'" for t in _JSON_TYPES[spec.json_type])
        if spec.required:
            branches.append(
                f"WHEN types[{index}] IS NULL OR types[{index}] = 'NULL' THEN 'missing required field {spec.name}'"
            )
        branches.append(
            f"WHEN types[{index}] IS NOT NULL AND types[{index}] <> 'NULL' AND types[{index}] NOT IN ({allowed}) "
            f"THEN 'field {spec.name} must be {_article(spec)} {spec.json_type}, not ' || {_json_type_name(f'types[{index}]')}"
        )
        if spec.json_type == "number":
            # DuckDB's JSON reader takes NaN, Infinity and literals past the double range (1e400
            # reads as inf); none is a latency or a cost, so the line is quarantined, not kept.
            branches.append(
                f"WHEN NOT isfinite(TRY_CAST(vals[{index - 1}] AS DOUBLE)) "
                f"THEN 'field {spec.name} must be a finite number, not ' || vals[{index - 1}]"
            )
    return "\n".join(branches)


def _json_type_name(duckdb_type: str) -> str:
    """SQL naming a DuckDB JSON type the way the schema and its readers do (integer, not ubigint)."""
    return (
        f"CASE {duckdb_type} WHEN 'VARCHAR' THEN 'string' WHEN 'BIGINT' THEN 'integer' WHEN 'UBIGINT' THEN 'integer' "
        f"WHEN 'DOUBLE' THEN 'number' WHEN 'BOOLEAN' THEN 'boolean' ELSE lower({duckdb_type}) END"
    )


def _article(spec: FieldSpec) -> str:
    return "an" if spec.json_type[0] in "aeiou" else "a"


def _judged_lines_sql(max_line_bytes: int) -> str:
    """One pass over a batch of lines: each line's reason to be quarantined (NULL: keep it),
    with the record's columns and the quarantine row's beside it."""
    paths = ", ".join(f"'$.{spec.name}'" for spec in SCHEMA_FIELDS)
    position = {spec.name: index for index, spec in enumerate(SCHEMA_FIELDS, start=1)}
    type_branches = _field_checks()
    versions = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)

    def value(name: str) -> str:
        return f"vals[{position[name]}]"

    return f"""
    WITH parsed AS (
        SELECT *,
            -- TRY_CAST rather than json_valid: DuckDB may evaluate json functions on every row
            -- whatever a CASE says, and they raise on malformed input.
            TRY_CAST(CASE WHEN utf8_ok AND nbytes <= {max_line_bytes} THEN line END AS JSON) AS doc
        FROM batch
    ), typed AS (
        -- The root's type comes with the fields' from one parse: NULL for a line that is not JSON.
        SELECT *, json_type(doc, ['$', {paths}]) AS types FROM parsed
    ), valued AS (
        SELECT *, CASE WHEN types[1] = 'OBJECT' THEN json_extract_string(doc, [{paths}]) END AS vals
        FROM typed
    ), judged AS (
        SELECT *,
            CASE
                WHEN NOT utf8_ok THEN 'invalid UTF-8'
                WHEN nbytes > {max_line_bytes} THEN 'line longer than {max_line_bytes} bytes'
                -- A blank line is never JSON. A full match of whitespace stops at a line's first
                -- other character, where a trim would copy every line that is not JSON.
                WHEN types IS NULL AND regexp_full_match(line, '[ \\t\\r\\n]*') THEN 'blank line'
                WHEN types IS NULL THEN 'not valid JSON'
                WHEN types[1] <> 'OBJECT' THEN 'not a JSON object'
                {type_branches}
                WHEN TRY_CAST({value("schema_version")} AS BIGINT) NOT IN ({versions})
                    THEN 'unsupported schema_version ' || {value("schema_version")}
                WHEN regexp_full_match({value("request_id")}, '[\\s\\p{{Z}}]*') THEN 'empty request_id'
                WHEN length({value("request_id")}) > {MAX_REQUEST_ID_CHARS} THEN 'request_id longer than {MAX_REQUEST_ID_CHARS} characters'
                WHEN TRY_CAST({value("timestamp")} AS TIMESTAMPTZ) IS NULL THEN 'timestamp is not ISO 8601'
                WHEN regexp_full_match({value("input")}, '[\\s\\p{{Z}}]*') THEN 'empty input'
                WHEN {value("response")} IS NULL AND {value("error")} IS NULL AND {value("student")} IS NULL
                    THEN 'neither response nor error'
                {_enum_checks(value)}
            END AS reason
        FROM valued
    )
    -- The record's columns are only read where the reason is NULL, and then every cast
    -- succeeds (the checks above saw to it); TRY_CAST keeps the other lines from raising.
    SELECT
        -- A kept line's request id is a string no longer than the limit; a quarantined line's
        -- is shown where it is a string.
        CASE WHEN types[{position["request_id"] + 1}] = 'VARCHAR'
             THEN left({value("request_id")}, {MAX_REQUEST_ID_CHARS}) END AS request_id,
        TRY_CAST({value("timestamp")} AS TIMESTAMPTZ) AS timestamp,
        CAST(TRY_CAST({value("timestamp")} AS TIMESTAMPTZ) AS DATE) AS day,
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
        TRY_CAST({value("latency_ms")} AS DOUBLE) AS latency_ms,
        TRY_CAST({value("cost_usd")} AS DOUBLE) AS cost_usd,
        {value("error")} AS error,
        {value("feedback")} AS feedback,
        {value("served_by")} AS served_by,
        {value("rollout")} AS rollout,
        {value("call_kind")} AS call_kind,
        {value("student")} AS student,
        {value("label_distribution")} AS label_distribution,
        TRY_CAST({value("schema_version")} AS INTEGER) AS schema_version,
        source_key,
        line_no AS source_line,
        reason,
        nbytes AS line_bytes,
        CASE WHEN reason IS NOT NULL THEN
             CASE WHEN utf8_ok THEN left(rtrim(line, chr(10) || chr(13)), {EXCERPT_CHARS}) ELSE excerpt END
        END AS excerpt
    FROM judged
    """


#: The reason a repeated request id is quarantined with (its excerpt says where it was first seen).
DUPLICATE_REASON = "duplicate request_id"

QUARANTINE_COLUMNS = ("source_key", "source_line", "reason", "request_id", "line_bytes", "excerpt")

#: Objects are validated in batches of about this many bytes: large enough to amortise the cost
#: of a query and for DuckDB to spread a batch over its threads, small enough to bound memory.
BATCH_BYTES = 64 * 2**20

_BATCH_SCHEMA = pa.schema(
    [
        ("source_key", pa.string()),
        ("line_no", pa.int64()),
        ("line", pa.large_string()),
        ("nbytes", pa.int64()),
        ("utf8_ok", pa.bool_()),
        ("excerpt", pa.string()),
    ]
)


class Ingestor:
    """Accumulates validated records and quarantined lines of many objects, then deduplicates.

    Use: ``add_object`` for each object, then ``finish`` to write two Parquet files.

    Every line goes into one table, ``lines``, with its record's columns and its reason to be
    quarantined (NULL for a record kept): each batch of objects is judged and stored in one
    query, and the two outputs are the two sides of that table.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    ) -> None:
        if max_object_bytes < 1:
            raise ValueError(f"max_object_bytes must be positive, not {max_object_bytes}")
        self.workdir = workdir
        self.max_line_bytes = max_line_bytes
        self.max_object_bytes = max_object_bytes
        self.con = duck.connect(workdir)
        self.stats = IngestStats()
        self._judged_lines_sql = _judged_lines_sql(max_line_bytes)
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        # A typed empty table, shaped by the same SELECT that fills it.
        self.con.register("batch", _BATCH_SCHEMA.empty_table())
        try:
            self.con.execute(f"CREATE TABLE lines AS {self._judged_lines_sql}")
        finally:
            self.con.unregister("batch")

    def add_object(self, key: str, data: bytes) -> None:
        self._count_object(key, len(data))
        if len(data) > self.max_object_bytes:
            self._quarantine_object(key, _too_large(self.max_object_bytes))
            return
        try:
            data = decompress_if_needed(key, data, self.max_object_bytes)
        except ObjectTooLarge:
            self._quarantine_object(key, f"{_too_large(self.max_object_bytes)} decompressed")
            return
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
        self._pending.append(
            pa.table(
                [
                    pa.repeat(key, count).cast(pa.string()),
                    pa.array(np.arange(1, count + 1, dtype=np.int64)),
                    batch.lines,
                    batch.nbytes,
                    batch.utf8_ok,
                    excerpts,
                ],
                schema=_BATCH_SCHEMA,
            )
        )
        self._pending_bytes += len(data)
        self.stats.lines_in += count
        if self._pending_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self.con.register("batch", pa.concat_tables(self._pending))
        try:
            self.con.execute(f"INSERT INTO lines {self._judged_lines_sql}")
        finally:
            self.con.unregister("batch")
        self._pending, self._pending_bytes = [], 0

    def reject_object(self, key: str, reason: str) -> None:
        """Quarantine an object that was not read, e.g. because its key is unsafe."""
        self._count_object(key, 0)
        self._quarantine_object(key, reason)

    def _count_object(self, key: str, nbytes: int) -> None:
        self.stats.objects += 1
        self.stats.bytes_in += nbytes

    def _quarantine_object(self, key: str, reason: str) -> None:
        # The object's lines cannot be counted, so the object itself is the unit quarantined.
        self.stats.lines_in += 1
        # The objects before it go in first: the table holds the lines in key order.
        self._flush()
        self.con.execute("INSERT INTO lines (source_key, source_line, reason) VALUES (?, 0, ?)", [key, reason])

    def finish(self, records_path: Path, quarantine_path: Path, *, scrub_pii: bool = False) -> IngestStats:
        """Deduplicate by request id (first occurrence wins) and write both tables as Parquet,
        with the text of records and of quarantined lines scrubbed of PII if ``scrub_pii``."""
        self._flush()
        # Only request ids kept more than once are ranked: a few rows, not the day.
        self.con.execute(
            """
            UPDATE lines SET reason = ?, line_bytes = strlen(input),
                excerpt = 'first seen at ' || repeats.first_seen
            FROM (
                SELECT row_id, first_seen FROM (
                    SELECT rowid AS row_id,
                           row_number() OVER seen AS occurrence,
                           first_value(source_key || ':' || source_line) OVER seen AS first_seen
                    FROM lines
                    WHERE reason IS NULL AND request_id IN (
                        SELECT request_id FROM lines WHERE reason IS NULL GROUP BY request_id HAVING count(*) > 1
                    )
                    WINDOW seen AS (PARTITION BY request_id ORDER BY source_key, source_line)
                ) WHERE occurrence > 1
            ) AS repeats
            WHERE lines.rowid = repeats.row_id
            """,
            [DUPLICATE_REASON],
        )
        if scrub_pii:
            # A quarantined line's excerpt quotes the line; a duplicate's names where it was first seen.
            kept, quoting = "reason IS NULL", f"reason IS NOT NULL AND reason <> {duck.sql_string(DUPLICATE_REASON)}"
            self.stats.pii_scrubbed = pii.scrub_table(
                self.con, "lines", {"input": kept, "response": kept, "excerpt": quoting}
            )
        columns = ", ".join(RECORD_COLUMNS)
        # Objects are added in key order, each object's lines in order, and judging a batch is
        # projections alone (no join: see ``_enum_checks``), so the table holds the lines by
        # (source_key, source_line). A scan of one table with a WHERE keeps that order (DuckDB's
        # order-preservation rules; an UPDATE changes values, not a row's place), so the day's
        # full rows need no sort, which would spill past the memory limit.
        duck.copy_to_parquet(self.con, f"SELECT {columns} FROM lines WHERE reason IS NULL", records_path)
        duck.copy_to_parquet(
            self.con, f"SELECT {', '.join(QUARANTINE_COLUMNS)} FROM lines WHERE reason IS NOT NULL", quarantine_path
        )
        self.stats.kept = self.con.execute("SELECT count(*) FROM lines WHERE reason IS NULL").fetchone()[0]
        self.stats.reasons = dict(
            self.con.execute(
                "SELECT reason, count(*) FROM lines WHERE reason IS NOT NULL GROUP BY reason ORDER BY 2 DESC"
            ).fetchall()
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
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    scrub_pii: bool = False,
) -> IngestStats:
    """Validate the log objects at ``keys`` into a records table and a quarantine table."""
    ingestor = Ingestor(workdir, max_line_bytes=max_line_bytes, max_object_bytes=max_object_bytes)
    with ThreadPoolExecutor(max_workers=1) as reader:
        for key, read in _read_ahead(reader, store, sorted(keys), max_object_bytes):
            try:
                data = read.result()
            except UnsafeKey as exc:
                ingestor.reject_object(key, f"object not read: {exc.why}")
            except ObjectTooLarge:
                ingestor.reject_object(key, _too_large(max_object_bytes))
            else:
                ingestor.add_object(key, data)
    return ingestor.finish(records_path, quarantine_path, scrub_pii=scrub_pii)


#: Objects read ahead of the one being validated: the next download (or file read) runs while
#: DuckDB judges the lines before it, and at most this many objects more are held in memory.
READ_AHEAD = 2


def _read_ahead(
    reader: ThreadPoolExecutor, store: ObjectStore, keys: list[str], max_object_bytes: int
) -> Iterator[tuple[str, Future[bytes]]]:
    """Each key with the future of its bytes, in order, ``READ_AHEAD`` reads started ahead."""
    started: deque[tuple[str, Future[bytes]]] = deque()
    for key in keys:
        # Capped here too, so that an oversized object is never taken into memory.
        started.append((key, reader.submit(store.get_bytes, key, max_bytes=max_object_bytes)))
        if len(started) > READ_AHEAD:
            yield started.popleft()
    yield from started
