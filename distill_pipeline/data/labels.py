"""Teacher labels from logged responses: parse each response as the task says, quarantine the rest.

Every record that comes in leaves as a labelled row or a quarantined row with its reason: the
provider returned an error, the response could not be parsed (with the parser's reason), the
record belongs to another task, or the teacher gave no answer because the student served the call
(:data:`STUDENT_SERVED_REASON`). A label only ever comes from a teacher's ``response``: the
student's own answer (the record's ``student`` object) never becomes one, and a call the student
served alone is neither a teacher failure nor a parse failure. In the teacher modes a row's label comes instead from the
verdict of one or more configured teachers (``relabel.py`` asks them): for every row of the task
(``relabel``), or only where the logged response gave none (``fill``). Responses repeat heavily (a classifier teacher answers in a
handful of shapes), so each distinct response text is parsed once, and each record finds its
parse through a DuckDB function of its response: no join, so in the logged mode the day streams
from the records to the labels in its order, without a copy or a sort.

Reasons and response excerpts quote what providers said, so they are redacted
(:func:`~distill_pipeline.core.secrets.redact`) where they are formed: a key a provider or proxy
echoed never reaches the quarantine table, the review table, the stats or the manifest.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill_pipeline.core import duck
from distill_pipeline.core.secrets import redact_all
from distill_pipeline.core.task import Task
from distill_pipeline.data.parsing import ParseResult, parse_responses

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
    # The teacher's P(positive) where it gave a distribution (a two-label task): logged with the
    # call, from log-probabilities, or the vote shares of several teachers. Null: a hard label only.
    "soft_label",
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
    #: Calls the student served with no teacher answer (call kinds ``student`` and ``fallback``),
    #: left unlabelled; and those of them the teachers labelled (``relabel``, ``fill``).
    student_served: int = 0
    student_served_filled: int = 0
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
    "t_soft",
)
LabelMode = Literal["logged", "relabel", "fill"]
#: Why a call the student served alone has no label: not a failure of the teacher nor of the parser.
STUDENT_SERVED_REASON = "no teacher answer (student-served)"
#: The serving columns of a version 2 ``raw_logs`` table; a table written before them reads as NULLs.
SERVING_COLUMNS = ("served_by", "call_kind", "student", "label_distribution")
LABEL_MODES: tuple[LabelMode, ...] = ("logged", "relabel", "fill")
REDACT_FUNCTION = "redact_secrets"
#: A logged response's parse (see ``_ParseLookup``), registered where the ``logged`` view is made.
PARSE_FUNCTION = "logged_parse"


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


# The teacher did not answer a call the student served: it was not asked (``student``), or failed and
# the student's answer went out instead (``fallback``). A record without ``call_kind`` (another
# writer) is the student's when it says so, or when it carries only the student's answer.
_STUDENT_SERVED_SQL = """(r.response IS NULL AND CASE
    WHEN r.call_kind IS NOT NULL THEN r.call_kind IN ('student', 'fallback')
    ELSE r.served_by = 'student' OR (r.student IS NOT NULL AND r.error IS NULL)
END)"""


def _logged_view(con: duckdb.DuckDBPyConnection, records_path: Path, task: Task) -> None:
    """A ``logged`` view: every record with the label its logged response gives, or why none."""
    source = f"read_parquet({duck.sql_string(str(records_path))})"
    present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    absent = "".join(f", NULL::VARCHAR AS {name}" for name in SERVING_COLUMNS if name not in present)
    con.execute(f"CREATE VIEW records AS SELECT *{absent} FROM {source}")
    distinct = con.execute(
        "SELECT response, hash(response) FROM records WHERE response IS NOT NULL GROUP BY response"
    ).fetchall()
    responses = [row[0] for row in distinct]
    lookup = _ParseLookup(responses, np.array([row[1] for row in distinct], np.uint64), parse_responses(responses, task.label))
    con.create_function(
        PARSE_FUNCTION,
        lookup,
        [duckdb.sqltypes.UBIGINT, duckdb.sqltypes.VARCHAR],
        _PARSE_TYPE,
        type="arrow",
        null_handling="special",
        side_effects=False,
    )
    task_id = duck.sql_string(task.id)
    # A view, not a table: whoever reads it (the judged rows, the teachers' inputs) reads the
    # records once, where a table would hold a second copy of the day. Each record's parse is a
    # function of its response (no join), so the view keeps the records' order and runs on every
    # core. Every reason that may quote a provider or a writer (a task name, an error, an answer)
    # is redacted where it is formed.
    con.execute(
        f"""
        CREATE VIEW logged AS
        SELECT r.* EXCLUDE (parse), r.parse.label AS logged_label, r.parse.parse_method AS logged_method,
            {_logged_soft_sql(task)} AS logged_soft,
            r.task IS NULL OR r.task = {task_id} AS of_task,
            {_STUDENT_SERVED_SQL} AS student_served,
            CASE
                WHEN r.task IS NOT NULL AND r.task <> {task_id}
                    THEN 'record of another task: ' || {REDACT_FUNCTION}(left(r.task, 40))
                WHEN {_STUDENT_SERVED_SQL} THEN '{STUDENT_SERVED_REASON}'
                WHEN r.error IS NOT NULL AND r.response IS NULL
                    THEN 'provider error: ' || left({REDACT_FUNCTION}(r.error), {REASON_CHARS})
                WHEN r.parse.label IS NULL THEN 'unparseable response: ' || coalesce(r.parse.parse_error, 'no response')
            END AS logged_reason
        FROM (SELECT *, {PARSE_FUNCTION}(hash(response), response) AS parse FROM records) r
        """
    )


_PARSE_TYPE = duckdb.struct_type(
    {"label": duckdb.sqltypes.BIGINT, "parse_method": duckdb.sqltypes.VARCHAR, "parse_error": duckdb.sqltypes.VARCHAR}
)


class _ParseLookup:
    """The parse of each response, as a DuckDB function of ``(hash(response), response)``.

    Found by binary search of the distinct responses' hashes and confirmed by comparing the text,
    so two responses with one hash (once in about 2**64 / n**2 days) still get their own parse:
    the few rows not confirmed are looked up by text. A function keeps the records in their order
    and runs on every core, where a join with a table of parses would reorder the day (and
    sorting it back costs more than the parsing).
    """

    def __init__(self, responses: list[str], hashes: np.ndarray, results: list[ParseResult]) -> None:
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.responses = pa.array(responses, pa.string()).take(pa.array(order))
        self.parses = pa.StructArray.from_arrays(
            [
                pa.array([results[i].label for i in order], pa.int64()),
                pa.array([results[i].method for i in order], pa.string()),
                # A parser may quote the answer it could not read: redacted once per distinct response.
                pa.array(redact_all([results[i].error for i in order]), pa.string()),
            ],
            names=["label", "parse_method", "parse_error"],
        )

    @functools.cached_property
    def position(self) -> dict[str, int]:
        """Each response's row, for the rows a hash did not confirm: built only if one is met."""
        return {response: index for index, response in enumerate(self.responses.to_pylist())}

    def __call__(self, hashes: pa.Array, responses: pa.Array) -> pa.Array:
        missing = responses.is_null().to_numpy(zero_copy_only=False)
        if not len(self.hashes):
            return pa.nulls(len(responses), self.parses.type)
        index = np.minimum(np.searchsorted(self.hashes, hashes.to_numpy(zero_copy_only=False)), len(self.hashes) - 1)
        confirmed = pc.fill_null(pc.equal(self.responses.take(pa.array(index)), responses), False)
        for row in np.flatnonzero(~confirmed.to_numpy(zero_copy_only=False) & ~missing):
            index[row] = self.position[responses[int(row)].as_py()]
        return self.parses.take(pa.array(index, mask=missing))


def _logged_soft_sql(task: Task) -> str:
    """SQL for a record's P(positive) from its logged ``label_distribution``: NULL unless every key
    is a label value, every probability a JSON number in [0, 1], and they sum to 1 (within 1e-3),
    as :func:`~distill_pipeline.teachers.soft.from_json_keys` asks of one."""
    label = task.label
    if label.positive is None or len(label.values) != 2:
        return "NULL::DOUBLE"
    keys = ", ".join(f"'{value}'" for value in label.values)
    entries = "TRY_CAST(r.label_distribution AS JSON)"

    def number(key: str) -> str:
        path = f"""'$."' || {key} || '"'"""
        return (
            f"CASE WHEN json_type({entries}, {path}) IN ('DOUBLE', 'BIGINT', 'UBIGINT') "
            f"THEN CAST(json_extract_string({entries}, {path}) AS DOUBLE) END"
        )

    valid = f"""(
        json_type({entries}) = 'OBJECT'
        AND list_has_all([{keys}], json_keys({entries}))
        AND list_bool_and(list_transform(json_keys({entries}), lambda k: coalesce({number("k")} BETWEEN 0 AND 1, false)))
        AND abs(list_sum(list_transform(json_keys({entries}), lambda k: {number("k")})) - 1) <= 1e-3
    )"""
    positive = number(f"'{label.positive}'")
    return f"CASE WHEN r.label_distribution IS NOT NULL AND {valid} THEN coalesce({positive}, 0.0) END"


@dataclass(frozen=True)
class TeacherInputs:
    """The distinct inputs a teacher mode hands to teachers, in log order.

    ``required`` are the rows the labels need (every row in ``relabel``; those whose logged answer
    gave no label in ``fill``). ``student_served`` are the inputs only calls the student served
    alone have: worth a label, never worth failing the run for, so they are asked last and within
    the budget (see :func:`~distill_pipeline.teachers.relabel.ask_teachers`).
    """

    required: list[str]
    student_served: list[str]

    def __len__(self) -> int:
        return len(self.required) + len(self.student_served)


def inputs_for_teachers(records_path: Path, task: Task, workdir: Path, mode: LabelMode) -> TeacherInputs:
    """The distinct inputs teachers must answer in ``mode``: all of the task's, or those without a logged label."""
    if mode == "logged":
        return TeacherInputs([], [])
    con = _connect(workdir)
    try:
        _logged_view(con, records_path, task)
        wanted = "of_task" if mode == "relabel" else "of_task AND logged_label IS NULL"
        rows = con.execute(
            f"SELECT input, bool_and(student_served) FROM logged WHERE {wanted} AND input IS NOT NULL GROUP BY input "
            "ORDER BY min(source_key), min(source_line)"
        ).fetchall()
        return TeacherInputs([row[0] for row in rows if not row[1]], [row[0] for row in rows if row[1]])
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
    the logged response gave none (a provider error, an unparseable answer, a call the student
    served alone). In both, rows where teachers disagree go to ``review_path`` for a human. A
    student-served row with no verdict (the budget ran out before its turn) stays unlabelled as
    :data:`STUDENT_SERVED_REASON`, not as a teacher failure.
    """
    if mode != "logged" and verdicts is None:
        raise ValueError(f"label mode {mode!r} needs the teachers' verdicts")
    con = _connect(workdir)
    try:
        _logged_view(con, records_path, task)
        if mode == "logged":
            # A view over the records in their order (raw_logs writes them by source key and line),
            # so that the day is neither copied nor sorted: the outputs keep that order.
            con.execute(
                "CREATE VIEW judged AS SELECT * EXCLUDE (logged_label, logged_method, logged_reason, of_task, logged_soft), "
                "'logged' AS label_source, logged_soft AS soft_label, "
                "logged_label AS label, logged_method AS parse_method, logged_reason AS reason, "
                "response IS NOT NULL AND (logged_reason IS NULL OR logged_reason LIKE 'unparseable%') AS answered "
                "FROM logged"
            )
            columns = ", ".join(LABEL_COLUMNS)
            in_order = ""
        else:
            _judge_with_verdicts(con, verdicts, mode)
            columns = ", ".join(LABEL_COLUMNS + TEACHER_COLUMNS)
            # The join with the verdicts does not keep the records' order.
            in_order = " ORDER BY source_key, source_line"
            if review_path is not None:
                duck.copy_to_parquet(
                    con,
                    "SELECT request_id, input, label AS majority_label, teacher_agreement, teacher_votes, "
                    f"t_tied AS tied, {REDACT_FUNCTION}(t_detail) AS votes FROM judged "
                    "WHERE label_source = 'teacher' AND teacher_agreement < 1 "
                    "ORDER BY teacher_agreement, source_key, source_line",
                    review_path,
                )
        duck.copy_to_parquet(con, f"SELECT {columns} FROM judged WHERE reason IS NULL{in_order}", labels_path)
        duck.copy_to_parquet(
            con,
            "SELECT request_id, source_key, source_line, reason, model, prompt_template_id, "
            f"left({REDACT_FUNCTION}(response), 300) AS response_excerpt, left(input, 300) AS input_excerpt "
            f"FROM judged WHERE reason IS NOT NULL{in_order}",
            quarantine_path,
        )
        stats = _count_outcomes(con)
        stats.labelled = sum(stats.label_counts.values())
        stats.quarantined = sum(stats.reasons.values())
        if stats.labelled + stats.quarantined != stats.rows_in:
            raise AssertionError(f"label accounting broken: {stats}")
        return stats
    finally:
        con.close()


def _count_outcomes(con: duckdb.DuckDBPyConnection) -> LabelStats:
    """The stats of the ``judged`` rows, from one pass that counts each combination of outcomes."""
    groups = con.execute(
        "SELECT reason, label, parse_method, answered, student_served, label_source, count(*) "
        "FROM judged GROUP BY ALL"
    ).fetchall()
    stats = LabelStats()
    reasons: dict[str, int] = {}
    labels: dict[int, int] = {}
    methods: dict[str, int] = {}
    for reason, label, method, answered, student_served, source, count in groups:
        stats.rows_in += count
        stats.with_response += count if answered else 0
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + count
        else:
            labels[label] = labels.get(label, 0) + count
            methods[method] = methods.get(method, 0) + count
            stats.student_served_filled += count if student_served and source == "teacher" else 0
        if source == "teacher":
            stats.to_teachers += count
            stats.teacher_failures += 0 if answered else count
    stats.student_served = reasons.get(STUDENT_SERVED_REASON, 0)
    stats.reasons = dict(sorted(reasons.items(), key=lambda item: -item[1]))
    stats.label_counts = dict(sorted(labels.items()))
    stats.methods = dict(sorted(methods.items(), key=lambda item: -item[1]))
    return stats


def _judge_with_verdicts(con: duckdb.DuckDBPyConnection, verdicts: pa.Table | None, mode: LabelMode) -> None:
    """The ``judged`` table of a teacher mode: each row's label from the teachers or from its log."""
    assert verdicts is not None
    missing = set(VERDICT_COLUMNS) - set(verdicts.column_names)
    if missing:
        raise ValueError(f"teacher verdicts lack columns {sorted(missing)}")
    con.register("verdicts", verdicts.select(list(VERDICT_COLUMNS)))
    use = "l.of_task" if mode == "relabel" else "l.of_task AND l.logged_label IS NULL"
    # A student-served row the teachers were not asked about (the budget ran out) keeps its logged
    # outcome, STUDENT_SERVED_REASON, rather than counting as a row no teacher answered.
    use += " AND NOT (l.student_served AND v.input IS NULL)"
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
            CASE WHEN t.use_teacher THEN v.t_soft ELSE l.logged_soft END AS soft_label,
            CASE WHEN t.use_teacher THEN v.t_method ELSE l.logged_method END AS parse_method,
            CASE
                WHEN NOT t.use_teacher THEN l.logged_reason
                WHEN v.input IS NULL THEN 'teacher: no verdict for this input'
                WHEN v.t_label IS NULL THEN 'teacher: ' || {REDACT_FUNCTION}(coalesce(v.t_reason, 'no label'))
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
        LEFT JOIN verdicts v ON v.input = l.input
        CROSS JOIN LATERAL (SELECT {use} AS use_teacher) t
        """
    )
    con.unregister("verdicts")
