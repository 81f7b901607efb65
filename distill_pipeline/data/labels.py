"""Teacher labels from logged responses: parse each response as the task says, quarantine the rest.

Every record that comes in leaves as a labelled row or a quarantined row with its reason: the
provider returned an error, the response could not be parsed (with the parser's reason), or the
record belongs to another task. In the teacher modes a row's label comes instead from the
verdict of one or more configured teachers (``relabel.py`` asks them): for every row of the task
(``relabel``), or only where the logged response gave none (``fill``). Responses repeat heavily (a classifier teacher answers in a
handful of shapes), so each distinct response text is parsed once and joined back in DuckDB.

Reasons and response excerpts quote what providers said, so they are redacted
(:func:`~distill_pipeline.core.secrets.redact`) where they are written: a key a provider or proxy
echoed never reaches the quarantine table, the review table, the stats or the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa

from distill_pipeline.core import duck
from distill_pipeline.core.secrets import redact_all
from distill_pipeline.core.task import Task
from distill_pipeline.data.parsing import parse_responses

LABEL_COLUMNS = (
    "request_id",
    "timestamp",
    "day",
    "user_id",
    "tenant_id",
    "model",
    "prompt_template_id",
    "prompt_template_version",
    "input",
    "label",
    "parse_method",
    "source_key",
    "source_line",
)
REASON_CHARS = 200


@dataclass
class LabelStats:
    rows_in: int = 0
    labelled: int = 0
    quarantined: int = 0
    with_response: int = 0
    #: Rows whose label was asked of teachers (``relabel``, ``fill``), and those no teacher answered.
    to_teachers: int = 0
    teacher_failures: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    label_counts: dict[int, int] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)

    @property
    def parse_failures(self) -> int:
        return self.with_response - self.labelled

    @property
    def parse_rate(self) -> float:
        """Share of non-error responses that gave a label."""
        return self.labelled / self.with_response if self.with_response else 1.0

    @property
    def teacher_failure_rate(self) -> float:
        """Share of the rows handed to teachers that no teacher answered (0 when none were)."""
        return self.teacher_failures / self.to_teachers if self.to_teachers else 0.0


#: Extra columns of rows whose label may come from teachers (``relabel`` and ``fill`` modes).
TEACHER_COLUMNS = ("label_source", "teacher_agreement", "teacher_votes")
#: Columns of the verdict table teachers give, one row per distinct input (see ``relabel.py``).
VERDICT_COLUMNS = (
    "input",
    "t_label",
    "t_method",
    "t_model",
    "t_prompt_id",
    "t_prompt_version",
    "t_agreement",
    "t_votes",
    "t_tied",
    "t_detail",
    "t_response",
    "t_reason",
)
LabelMode = Literal["logged", "relabel", "fill"]
LABEL_MODES: tuple[LabelMode, ...] = ("logged", "relabel", "fill")
REDACT_FUNCTION = "redact_secrets"


def _redact_column(texts: pa.Array) -> pa.Array:
    return pa.array(redact_all(texts.to_pylist()), pa.string())


def _connect(workdir: Path) -> duckdb.DuckDBPyConnection:
    """A scratch connection where ``redact_secrets(text)`` takes the secrets out of a provider's text."""
    con = duck.connect(workdir)
    varchar = duckdb.sqltypes.VARCHAR
    con.create_function(
        REDACT_FUNCTION, _redact_column, [varchar], varchar, type="arrow", null_handling="special", side_effects=False
    )
    return con


def _logged_view(con: duckdb.DuckDBPyConnection, records_path: Path, task: Task) -> None:
    """A ``logged`` table: every record with the label its logged response gives, or why none."""
    con.execute(f"CREATE VIEW records AS SELECT * FROM read_parquet({duck.sql_string(str(records_path))})")
    responses = [
        row[0] for row in con.execute("SELECT DISTINCT response FROM records WHERE response IS NOT NULL").fetchall()
    ]
    results = parse_responses(responses, task.label)
    parsed = pa.table(
        {
            "response": pa.array(responses, pa.string()),
            "label": pa.array([r.label for r in results], pa.int64()),
            "parse_method": pa.array([r.method for r in results], pa.string()),
            "parse_error": pa.array([r.error for r in results], pa.string()),
        }
    )
    con.register("parsed", parsed)
    task_id = duck.sql_string(task.id)
    con.execute(
        f"""
        CREATE TABLE logged AS
        SELECT r.*, p.label AS logged_label, p.parse_method AS logged_method,
            r.task IS NULL OR r.task = {task_id} AS of_task,
            CASE
                WHEN r.task IS NOT NULL AND r.task <> {task_id} THEN 'record of another task: ' || left(r.task, 40)
                WHEN r.error IS NOT NULL AND r.response IS NULL
                    THEN 'provider error: ' || left({REDACT_FUNCTION}(r.error), {REASON_CHARS})
                WHEN p.label IS NULL THEN 'unparseable response: ' || coalesce(p.parse_error, 'no response')
            END AS logged_reason
        FROM records r LEFT JOIN parsed p ON r.response = p.response
        """
    )
    con.unregister("parsed")


def inputs_for_teachers(records_path: Path, task: Task, workdir: Path, mode: LabelMode) -> list[str]:
    """The distinct inputs teachers must answer in ``mode``: all of the task's, or those without a logged label."""
    if mode == "logged":
        return []
    con = _connect(workdir)
    try:
        _logged_view(con, records_path, task)
        wanted = "of_task" if mode == "relabel" else "of_task AND logged_label IS NULL"
        rows = con.execute(
            f"SELECT input FROM logged WHERE {wanted} AND input IS NOT NULL GROUP BY input ORDER BY min(source_key), "
            "min(source_line)"
        ).fetchall()
        return [row[0] for row in rows]
    finally:
        con.close()


def label_records(
    records_path: Path,
    task: Task,
    workdir: Path,
    labels_path: Path,
    quarantine_path: Path,
    *,
    mode: LabelMode = "logged",
    verdicts: pa.Table | None = None,
    review_path: Path | None = None,
) -> LabelStats:
    """Label every record in ``records_path`` (a ``raw_logs`` table).

    ``logged`` parses each logged response. ``relabel`` takes every row's label from the
    teachers' ``verdicts`` (see :data:`VERDICT_COLUMNS`); ``fill`` takes it from them only where
    the logged response gave none (a provider error, an unparseable answer). In both, rows where
    teachers disagree go to ``review_path`` for a human.
    """
    if mode != "logged" and verdicts is None:
        raise ValueError(f"label mode {mode!r} needs the teachers' verdicts")
    con = _connect(workdir)
    try:
        _logged_view(con, records_path, task)
        if mode == "logged":
            con.execute(
                "CREATE TABLE judged AS SELECT * EXCLUDE (logged_label, logged_method, logged_reason, of_task), "
                "logged_label AS label, logged_method AS parse_method, logged_reason AS reason, "
                "response IS NOT NULL AND (logged_reason IS NULL OR logged_reason LIKE 'unparseable%') AS answered "
                "FROM logged"
            )
            columns = ", ".join(LABEL_COLUMNS)
        else:
            _judge_with_verdicts(con, verdicts, mode)
            columns = ", ".join(LABEL_COLUMNS + TEACHER_COLUMNS)
            if review_path is not None:
                duck.copy_to_parquet(
                    con,
                    "SELECT request_id, input, label AS majority_label, teacher_agreement, teacher_votes, "
                    f"t_tied AS tied, {REDACT_FUNCTION}(t_detail) AS votes FROM judged "
                    "WHERE label_source = 'teacher' AND teacher_agreement < 1 "
                    "ORDER BY teacher_agreement, source_key, source_line",
                    review_path,
                )
        # A reason may quote a provider (its error, a parser quoting its answer): redacted here, before
        # the quarantine table, the stats and the manifest take it (a logged error also before it is
        # cut short, so that no key is cut where its pattern no longer matches).
        con.execute(f"UPDATE judged SET reason = {REDACT_FUNCTION}(reason) WHERE reason IS NOT NULL")
        duck.copy_to_parquet(
            con, f"SELECT {columns} FROM judged WHERE reason IS NULL ORDER BY source_key, source_line", labels_path
        )
        duck.copy_to_parquet(
            con,
            "SELECT request_id, source_key, source_line, reason, model, prompt_template_id, "
            f"left({REDACT_FUNCTION}(response), 300) AS response_excerpt, left(input, 300) AS input_excerpt "
            "FROM judged WHERE reason IS NOT NULL ORDER BY source_key, source_line",
            quarantine_path,
        )
        stats = LabelStats()
        stats.rows_in = con.execute("SELECT count(*) FROM judged").fetchone()[0]
        stats.with_response = con.execute("SELECT count(*) FROM judged WHERE answered").fetchone()[0]
        if mode != "logged":
            stats.to_teachers, stats.teacher_failures = con.execute(
                "SELECT count(*), count(*) FILTER (WHERE NOT coalesce(answered, false)) "
                "FROM judged WHERE label_source = 'teacher'"
            ).fetchone()
        stats.reasons = dict(
            con.execute(
                "SELECT reason, count(*) FROM judged WHERE reason IS NOT NULL GROUP BY 1 ORDER BY 2 DESC"
            ).fetchall()
        )
        stats.label_counts = dict(
            con.execute("SELECT label, count(*) FROM judged WHERE reason IS NULL GROUP BY 1 ORDER BY 1").fetchall()
        )
        stats.methods = dict(
            con.execute(
                "SELECT parse_method, count(*) FROM judged WHERE reason IS NULL GROUP BY 1 ORDER BY 2 DESC"
            ).fetchall()
        )
        stats.labelled = sum(stats.label_counts.values())
        stats.quarantined = sum(stats.reasons.values())
        if stats.labelled + stats.quarantined != stats.rows_in:
            raise AssertionError(f"label accounting broken: {stats}")
        return stats
    finally:
        con.close()


def _judge_with_verdicts(con: duckdb.DuckDBPyConnection, verdicts: pa.Table | None, mode: LabelMode) -> None:
    """The ``judged`` table of a teacher mode: each row's label from the teachers or from its log."""
    assert verdicts is not None
    missing = set(VERDICT_COLUMNS) - set(verdicts.column_names)
    if missing:
        raise ValueError(f"teacher verdicts lack columns {sorted(missing)}")
    con.register("verdicts", verdicts.select(list(VERDICT_COLUMNS)))
    use = "l.of_task" if mode == "relabel" else "l.of_task AND l.logged_label IS NULL"
    con.execute(
        f"""
        CREATE TABLE judged AS
        SELECT l.* EXCLUDE (model, prompt_template_id, prompt_template_version, response),
            CASE WHEN t.use_teacher THEN v.t_model ELSE l.model END AS model,
            CASE WHEN t.use_teacher THEN v.t_prompt_id ELSE l.prompt_template_id END AS prompt_template_id,
            CASE WHEN t.use_teacher THEN v.t_prompt_version ELSE l.prompt_template_version END
                AS prompt_template_version,
            CASE WHEN t.use_teacher THEN v.t_response ELSE l.response END AS response,
            CASE WHEN t.use_teacher THEN v.t_label ELSE l.logged_label END AS label,
            CASE WHEN t.use_teacher THEN v.t_method ELSE l.logged_method END AS parse_method,
            CASE
                WHEN NOT t.use_teacher THEN l.logged_reason
                WHEN v.input IS NULL THEN 'teacher: no verdict for this input'
                WHEN v.t_label IS NULL THEN 'teacher: ' || coalesce(v.t_reason, 'no label')
            END AS reason,
            CASE WHEN t.use_teacher THEN 'teacher' ELSE 'logged' END AS label_source,
            CASE WHEN t.use_teacher THEN v.t_agreement END AS teacher_agreement,
            CASE WHEN t.use_teacher THEN v.t_votes END AS teacher_votes,
            v.t_tied, v.t_detail,
            CASE
                WHEN t.use_teacher THEN v.t_label IS NOT NULL OR v.t_reason LIKE 'unparseable%'
                ELSE l.response IS NOT NULL AND (l.logged_reason IS NULL OR l.logged_reason LIKE 'unparseable%')
            END AS answered
        FROM logged l
        CROSS JOIN LATERAL (SELECT {use} AS use_teacher) t
        LEFT JOIN verdicts v ON v.input = l.input
        """
    )
    con.unregister("verdicts")
