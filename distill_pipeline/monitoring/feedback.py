"""End-user feedback per served model: the slow evals of a student in front of users.

Feedback comes two ways: inline, in a log record's ``feedback`` object (given while the call was
logged), and late, as :class:`~distill_pipeline.logs.schema.FeedbackEvent` lines in the feedback
stream (``feedback/dt=YYYY-MM-DD/*.jsonl``), joined to calls by request id. The reader validates
every line with the schema's own rule (``feedback_problems``), quarantines the bad ones with their
reason, and keeps one verdict per (request id, kind): a user who turns a thumbs-up into a
thumbs-down counts once, with the later verdict.

Rates are per *served model*: the teacher model for calls the teacher answered, the student's
train id for calls the student answered; each with its Wilson interval, and each student tested
against each teacher (two-proportion z-test). Calls are counted whatever their feedback, so a
rate is the share of all calls served, not of those that got a verdict.
"""

from __future__ import annotations

import datetime as dt
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from distill_pipeline.core import duck
from distill_pipeline.core.store import ObjectStore, ObjectTooLarge, UnsafeKey
from distill_pipeline.data.ingest import decompress_if_needed
from distill_pipeline.logs.schema import (
    FEEDBACK_PREFIX,
    FEEDBACK_SCHEMA_VERSION,
    LOG_SUFFIXES,
    feedback_problems,
)
from distill_pipeline.monitoring.live import SERVED_BY_SQL, SERVED_MODEL_SQL, records_view
from distill_pipeline.monitoring.proportions import Proportion, TwoProportionTest, two_proportion_test, wilson

#: What one feedback verdict is about; an event may carry both.
FEEDBACK_KINDS = ("thumbs", "regenerate")
EXCERPT_CHARS = 300
#: A feedback object larger than this is quarantined whole, unread (feedback lines are tiny).
MAX_FEEDBACK_OBJECT_BYTES = 64 * 2**20

EVENT_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("kind", pa.string()),
        ("value", pa.string()),
        ("timestamp", pa.string()),
        ("source_key", pa.string()),
        ("source_line", pa.int64()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [("source_key", pa.string()), ("source_line", pa.int64()), ("reason", pa.string()), ("excerpt", pa.string())]
)


@dataclass
class FeedbackStream:
    """The verdicts read from the stream (one per request id and kind) and what was set aside."""

    events: pa.Table
    quarantine: pa.Table
    objects: int = 0
    lines_in: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def quarantined(self) -> int:
        return self.quarantine.num_rows


def feedback_prefix(day: str) -> str:
    return f"{FEEDBACK_PREFIX}/dt={day}/"


def read_feedback(
    store: ObjectStore, days: Sequence[str], *, max_object_bytes: int = MAX_FEEDBACK_OBJECT_BYTES
) -> FeedbackStream:
    """Every feedback event of ``days``, validated; a bad line is quarantined, never dropped.

    ``lines in = verdict lines + quarantined``; the verdicts are then deduplicated by (request id,
    kind), the latest timestamp winning (the later line on a tie).
    """
    rows: list[dict[str, object]] = []
    bad: list[dict[str, object]] = []
    objects = lines_in = 0
    for day in days:
        keys = sorted(info.key for info in store.list(feedback_prefix(day)) if info.key.endswith(LOG_SUFFIXES))
        for key in keys:
            objects += 1
            try:
                data = decompress_if_needed(key, store.get_bytes(key, max_bytes=max_object_bytes), max_object_bytes)
            except (ObjectTooLarge, UnsafeKey, EOFError, OSError, zlib.error) as exc:
                lines_in += 1
                bad.append(
                    {"source_key": key, "source_line": 0, "reason": f"unreadable object: {exc}", "excerpt": None}
                )
                continue
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            for number, raw in enumerate(lines, start=1):
                lines_in += 1
                events, reason = _parse_line(raw)
                if reason is not None:
                    excerpt = raw[:EXCERPT_CHARS].decode("utf-8", "replace")
                    bad.append({"source_key": key, "source_line": number, "reason": reason, "excerpt": excerpt})
                    continue
                rows += [{**event, "source_key": key, "source_line": number} for event in events]
    table = pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)
    kept = _latest_per_request_and_kind(table)
    reasons: dict[str, int] = {}
    for row in bad:
        reasons[str(row["reason"])] = reasons.get(str(row["reason"]), 0) + 1
    return FeedbackStream(
        events=kept,
        quarantine=pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA),
        objects=objects,
        lines_in=lines_in,
        duplicates=table.num_rows - kept.num_rows,
        reasons=reasons,
    )


def _parse_line(raw: bytes) -> tuple[list[dict[str, object]], str | None]:
    """The verdicts of one line, or why it has none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return [], "invalid UTF-8"
    if not text.strip():
        return [], "blank line"
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return [], "not valid JSON"
    if not isinstance(record, dict):
        return [], "not a JSON object"
    version = record.get("schema_version", FEEDBACK_SCHEMA_VERSION)
    if version != FEEDBACK_SCHEMA_VERSION or isinstance(version, bool):
        return [], f"unsupported schema_version {str(version)[:20]}"
    problems = feedback_problems(record.get("request_id"), record.get("feedback"))
    if problems:
        return [], "; ".join(problems)
    timestamp = record.get("timestamp")
    if timestamp is not None:
        if not isinstance(timestamp, str):
            return [], "timestamp must be a string"
        try:
            parsed = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
        except ValueError:
            return [], "timestamp is not ISO 8601"
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        timestamp = parsed.astimezone(dt.UTC).isoformat()
    verdict = record["feedback"]
    events = []
    for kind in FEEDBACK_KINDS:
        if kind in verdict:
            value = verdict[kind] if kind == "thumbs" else "true"
            events.append({"request_id": record["request_id"], "kind": kind, "value": value, "timestamp": timestamp})
    return events, None


def _latest_per_request_and_kind(table: pa.Table) -> pa.Table:
    con = duck.connect()
    try:
        con.register("events", table)
        return con.sql(
            "SELECT * EXCLUDE (n) FROM (SELECT *, row_number() OVER (PARTITION BY request_id, kind "
            "ORDER BY timestamp DESC NULLS LAST, source_key DESC, source_line DESC) AS n FROM events) "
            "WHERE n = 1 ORDER BY source_key, source_line, kind"
        ).to_arrow_table()
    finally:
        con.close()


# --- rates per served model -----------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackRates:
    """How users reacted to one served model's answers (the playbook's slow evals)."""

    model: str
    calls: int
    with_feedback: int
    thumbs_up: int
    thumbs_down: int
    regenerated: int
    #: ``teacher`` (``model`` is the teacher model) or ``student`` (``model`` is its train id).
    served_by: str = "teacher"

    @property
    def thumbs_up_rate(self) -> float:
        return self.thumbs_up / self.calls if self.calls else 0.0

    @property
    def thumbs_down_rate(self) -> float:
        return self.thumbs_down / self.calls if self.calls else 0.0

    @property
    def regenerate_rate(self) -> float:
        return self.regenerated / self.calls if self.calls else 0.0

    def thumbs_down_interval(self) -> Proportion:
        return wilson(self.thumbs_down, self.calls)

    def regenerate_interval(self) -> Proportion:
        return wilson(self.regenerated, self.calls)

    def to_dict(self) -> dict[str, object]:
        down, regenerate = self.thumbs_down_interval(), self.regenerate_interval()
        return {
            "model": self.model,
            "served_by": self.served_by,
            "calls": self.calls,
            "with_feedback": self.with_feedback,
            "thumbs_up": self.thumbs_up,
            "thumbs_down": self.thumbs_down,
            "regenerated": self.regenerated,
            "thumbs_up_rate": self.thumbs_up_rate,
            "thumbs_down_rate": self.thumbs_down_rate,
            "thumbs_down_low": down.low,
            "thumbs_down_high": down.high,
            "regenerate_rate": self.regenerate_rate,
            "regenerate_low": regenerate.low,
            "regenerate_high": regenerate.high,
        }


def feedback_rates(records_path: Path, events: pa.Table | None = None) -> list[FeedbackRates]:
    """Feedback counts per served model from a raw_logs records table and the stream's verdicts.

    Inline ``feedback`` counts ``thumbs`` (``"up"``/``"down"``) and ``regenerate`` (or the older
    ``regenerated``) true; other keys are ignored. A verdict in the stream replaces the inline
    one of the same kind for the same call (it came later).
    """
    con = duck.connect()
    try:
        records_view(con, records_path)
        con.register("stream", events if events is not None else EVENT_SCHEMA.empty_table())
        rows = con.execute(
            f"""
            WITH calls AS (
                SELECT request_id, {SERVED_BY_SQL} AS served_by, {SERVED_MODEL_SQL} AS served_model,
                    CAST(feedback AS VARCHAR) AS f
                FROM records
            ), given AS (
                SELECT request_id, 'thumbs' AS kind, lower(json_extract_string(f, '$.thumbs')) AS value,
                    0 AS priority, NULL::VARCHAR AS ts
                FROM calls WHERE lower(json_extract_string(f, '$.thumbs')) IN ('up', 'down')
                UNION ALL
                SELECT request_id, 'regenerate', 'true', 0, NULL FROM calls
                WHERE lower(coalesce(json_extract_string(f, '$.regenerate'), json_extract_string(f, '$.regenerated')))
                    = 'true'
                UNION ALL
                SELECT request_id, kind, value, 1, timestamp FROM stream
            ), verdicts AS (
                SELECT request_id,
                    max(value) FILTER (WHERE kind = 'thumbs') AS thumbs,
                    bool_or(kind = 'regenerate') AS regenerate
                FROM (
                    SELECT *, row_number() OVER (PARTITION BY request_id, kind ORDER BY priority DESC, ts DESC NULLS LAST)
                        AS n
                    FROM given
                ) WHERE n = 1
                GROUP BY request_id
            )
            SELECT c.served_model, count(*),
                count(*) FILTER (WHERE v.request_id IS NOT NULL),
                count(*) FILTER (WHERE v.thumbs = 'up'),
                count(*) FILTER (WHERE v.thumbs = 'down'),
                count(*) FILTER (WHERE v.regenerate),
                c.served_by
            FROM calls c LEFT JOIN verdicts v ON c.request_id = v.request_id
            GROUP BY c.served_by, c.served_model ORDER BY c.served_by DESC, c.served_model
            """
        ).fetchall()
    finally:
        con.close()
    return [FeedbackRates(str(row[0]), *(int(v) for v in row[1:6]), served_by=str(row[6])) for row in rows]


@dataclass(frozen=True)
class ABComparison:
    """One student against one teacher on the same days of traffic: a positive difference is worse."""

    student: str
    teacher: str
    thumbs_down: TwoProportionTest
    regenerate: TwoProportionTest

    def to_dict(self) -> dict[str, object]:
        return {
            "student": self.student,
            "teacher": self.teacher,
            "thumbs_down": self.thumbs_down.to_dict(),
            "regenerate": self.regenerate.to_dict(),
        }


def ab_comparisons(rates: Sequence[FeedbackRates]) -> list[ABComparison]:
    """Each student's thumbs-down and regenerate rates tested against each teacher's."""
    students = [r for r in rates if r.served_by == "student"]
    teachers = [r for r in rates if r.served_by == "teacher"]
    return [
        ABComparison(
            s.model,
            t.model,
            two_proportion_test(s.thumbs_down_interval(), t.thumbs_down_interval()),
            two_proportion_test(s.regenerate_interval(), t.regenerate_interval()),
        )
        for s in students
        for t in teachers
    ]


def rates_markdown(rates: Sequence[FeedbackRates]) -> str:
    from distill_pipeline.core.reporting import markdown_table

    return markdown_table(
        [
            (
                r.served_by,
                r.model,
                f"{r.calls:,}",
                f"{r.with_feedback:,}",
                r.thumbs_down_interval().text(),
                r.regenerate_interval().text(),
            )
            for r in rates
        ],
        ["served by", "model", "calls", "with feedback", "thumbs-down rate [95% CI]", "regenerate rate [95% CI]"],
    )


def ab_markdown(comparisons: Sequence[ABComparison], alpha: float = 0.05) -> str:
    from distill_pipeline.core.reporting import markdown_table

    if not comparisons:
        return "_no student and teacher both served calls: nothing to compare_"

    def cell(test: TwoProportionTest) -> str:
        verdict = "worse" if test.difference > 0 else "better"
        word = verdict if test.significant(alpha) else "no difference shown"
        return f"{100 * test.difference:+.2f} pts [{100 * test.low:+.2f}, {100 * test.high:+.2f}], p = {test.p_value:.3g} ({word})"

    return markdown_table(
        [(c.student, c.teacher, cell(c.thumbs_down), cell(c.regenerate)) for c in comparisons],
        ["student", "teacher", "thumbs-down, student - teacher", "regenerate, student - teacher"],
    )


def feedback_days(day: str, lag_days: int, today: dt.date | None = None) -> list[str]:
    """The stream days that can hold verdicts on ``day``'s calls: that day and up to ``lag_days`` after, none in the future."""
    first = dt.date.fromisoformat(day)
    last = min(first + dt.timedelta(days=lag_days), max(today or dt.datetime.now(dt.UTC).date(), first))
    return [(first + dt.timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
