"""What a day of served traffic says about the student in front of users.

Once ``distill-pipeline serve`` answers calls, the teacher no longer sees all traffic, and each
call's ``call_kind`` says which measurements it can support (see ``logs/schema.py``):

- **live agreement**: the served student's label against the teacher's parsed label, on
  ``shadow`` and ``sample`` pairs only, the calls on which both answered for a reason unrelated
  to the input. ``deferred`` pairs are reported apart and marked biased: the student handed them
  on because it was unsure of them, so its agreement there understates it.
- **traffic**: the share of calls per call kind and who answered them.
- **the prior**: the share of positives among the day's traffic, as the teacher's label rate (on
  the calls it labelled for a reason unrelated to the input, so without ``deferred`` ones) and as
  the EM estimate from the student's own probabilities on every call it ran
  (``trainer.calibration.estimate_prior``), beside the share the champion was trained at.

Everything is computed in DuckDB from the day's ``raw_logs`` records joined to its
``teacher_labels`` by request id; a records table written before log schema version 2 reads as
teacher-only traffic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from distill_pipeline.core import duck
from distill_pipeline.monitoring.proportions import Proportion, wilson

#: Call kinds whose pairs sample traffic without regard to the input: the live agreement.
UNBIASED_PAIRS = ("shadow", "sample")
#: Pairs the student chose to hand on: reported, never used for a decision.
BIASED_PAIRS = ("deferred",)
#: Students' probabilities the prior is estimated from: a seeded sample, so the EM stays fast.
PRIOR_SAMPLE_ROWS = 5_000

#: The serving columns (and the id) a records table written before log schema version 2 lacks.
_SERVING_COLUMNS = ("request_id", "served_by", "call_kind", "student", "feedback")

#: Who answered the caller: the student when the record says so (or, without ``served_by``, when
#: its call kind is one the student answers), else the teacher (every version 1 record).
SERVED_BY_SQL = """CASE WHEN served_by = 'student'
    OR (served_by IS NULL AND call_kind IN ('student', 'sample', 'fallback')) THEN 'student' ELSE 'teacher' END"""
#: The model that answered the caller: the student's train id, or the teacher model.
SERVED_MODEL_SQL = f"""CASE WHEN {SERVED_BY_SQL} = 'student'
    THEN coalesce(json_extract_string(CAST(student AS VARCHAR), '$.train_id'), '(unknown student)') ELSE model END"""
#: A record's call kind; one without it is the teacher's alone, unless a student answer rode along.
CALL_KIND_SQL = "coalesce(call_kind, CASE WHEN student IS NULL THEN 'teacher' ELSE 'unspecified' END)"


def records_view(con: duckdb.DuckDBPyConnection, records_path: Path, name: str = "records") -> None:
    """``name``: a raw_logs records table, the serving columns NULL where the table predates them."""
    source = f"read_parquet({duck.sql_string(str(records_path))})"
    present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    absent = "".join(f", NULL::VARCHAR AS {column}" for column in _SERVING_COLUMNS if column not in present)
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT *{absent} FROM {source}")


@dataclass(frozen=True)
class ModelAgreement:
    """One served student's agreement with the teacher on one kind of pair, with its Wilson interval."""

    train_id: str
    pairs: int
    agreed: int
    low: float
    high: float
    biased: bool

    @property
    def rate(self) -> float:
        return self.agreed / self.pairs if self.pairs else 0.0

    def text(self) -> str:
        return f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}] on {self.pairs:,} pairs"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate}


@dataclass(frozen=True)
class TrafficShare:
    call_kind: str
    served_by: str
    calls: int
    share: float


@dataclass(frozen=True)
class PriorEstimate:
    """The day's share of positives, two ways, beside the champion's training share."""

    teacher_rate: Proportion | None
    em_prior: float | None
    em_rows: int
    em_train_id: str | None
    train_prior: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher_rate": None if self.teacher_rate is None else self.teacher_rate.to_dict(),
            "em_prior": self.em_prior,
            "em_rows": self.em_rows,
            "em_train_id": self.em_train_id,
            "train_prior": self.train_prior,
        }


@dataclass
class LiveReport:
    """A day of served traffic: who answered, how the served students agree with the teacher, the prior."""

    calls: int
    traffic: list[TrafficShare] = field(default_factory=list)
    agreement: list[ModelAgreement] = field(default_factory=list)
    deferred: list[ModelAgreement] = field(default_factory=list)
    #: Student answers that name no label of the task (or no train id): left out of every pair.
    invalid_student_answers: int = 0
    prior: PriorEstimate | None = None
    #: The champion and its agreement on the frozen in-distribution test set: what live agreement is held to.
    champion_train_id: str | None = None
    reference_agreement: float | None = None

    @property
    def student_served_share(self) -> float:
        served = sum(t.calls for t in self.traffic if t.served_by == "student")
        return served / self.calls if self.calls else 0.0

    def agreement_of(self, train_id: str | None) -> ModelAgreement | None:
        return next((a for a in self.agreement if a.train_id == train_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "student_served_share": self.student_served_share,
            "traffic": [asdict(t) for t in self.traffic],
            "agreement": [a.to_dict() for a in self.agreement],
            "deferred": [a.to_dict() for a in self.deferred],
            "invalid_student_answers": self.invalid_student_answers,
            "prior": None if self.prior is None else self.prior.to_dict(),
            "champion_train_id": self.champion_train_id,
            "reference_agreement": self.reference_agreement,
        }


def served_calls_view(
    con: duckdb.DuckDBPyConnection, records_path: Path, labels_path: Path | None, label_values: tuple[int, ...]
) -> None:
    """``calls``: every record with who answered, the student's answer and the teacher's label."""
    records_view(con, records_path)
    if labels_path is not None:
        con.execute(
            f"CREATE OR REPLACE VIEW labels AS SELECT request_id, label FROM read_parquet({duck.sql_string(str(labels_path))})"
        )
    else:
        con.execute(
            "CREATE OR REPLACE VIEW labels AS SELECT NULL::VARCHAR AS request_id, NULL::BIGINT AS label WHERE false"
        )
    values = ", ".join(str(int(v)) for v in label_values)
    con.execute(
        f"""
        CREATE OR REPLACE TABLE calls AS
        WITH r AS (
            SELECT request_id, {CALL_KIND_SQL} AS call_kind, {SERVED_BY_SQL} AS served_by,
                CAST(student AS VARCHAR) AS s
            FROM records
        )
        SELECT r.request_id, r.call_kind, r.served_by, r.s IS NOT NULL AS student_ran,
            json_extract_string(r.s, '$.train_id') AS train_id,
            TRY_CAST(json_extract_string(r.s, '$.label') AS BIGINT) AS raw_student_label,
            TRY_CAST(json_extract_string(r.s, '$.confidence') AS DOUBLE) AS confidence,
            l.label AS teacher_label
        FROM r LEFT JOIN labels l ON l.request_id = r.request_id
        """
    )
    # A student answer with a label outside the task's, or without a train id, pairs with nothing.
    con.execute(
        f"""
        CREATE OR REPLACE TABLE calls AS SELECT *,
            CASE WHEN raw_student_label IN ({values}) AND train_id IS NOT NULL THEN raw_student_label END AS student_label
        FROM calls
        """
    )


def live_report(
    records_path: Path,
    labels_path: Path | None,
    label_values: tuple[int, ...],
    positive: int | None,
    workdir: Path,
    *,
    champion_train_id: str | None = None,
    reference_agreement: float | None = None,
    train_prior: float | None = None,
    seed: int = 0,
) -> LiveReport:
    """The day's served traffic: shares per call kind, live agreement per served student, the prior."""
    con = duck.connect(workdir)
    try:
        served_calls_view(con, records_path, labels_path, label_values)
        calls = con.execute("SELECT count(*) FROM calls").fetchone()[0]
        report = LiveReport(calls, champion_train_id=champion_train_id, reference_agreement=reference_agreement)
        report.traffic = [
            TrafficShare(kind, served_by, n, n / calls)
            for kind, served_by, n in con.execute(
                "SELECT call_kind, served_by, count(*) FROM calls GROUP BY ALL ORDER BY 3 DESC, 1, 2"
            ).fetchall()
        ]
        report.invalid_student_answers = con.execute(
            "SELECT count(*) FROM calls WHERE student_ran AND student_label IS NULL"
        ).fetchone()[0]
        report.agreement = _agreement(con, UNBIASED_PAIRS, biased=False)
        report.deferred = _agreement(con, BIASED_PAIRS, biased=True)
        if positive is not None and len(label_values) == 2:
            report.prior = _prior(con, positive, champion_train_id, train_prior, seed)
        return report
    finally:
        con.close()


def _agreement(con: duckdb.DuckDBPyConnection, kinds: tuple[str, ...], *, biased: bool) -> list[ModelAgreement]:
    listed = ", ".join(f"'{k}'" for k in kinds)
    rows = con.execute(
        f"""
        SELECT train_id, count(*), count(*) FILTER (WHERE student_label = teacher_label)
        FROM calls
        WHERE call_kind IN ({listed}) AND student_label IS NOT NULL AND teacher_label IS NOT NULL
        GROUP BY train_id ORDER BY 2 DESC, 1
        """
    ).fetchall()
    agreements = []
    for train_id, pairs, agreed in rows:
        interval = wilson(int(agreed), int(pairs))
        agreements.append(ModelAgreement(str(train_id), int(pairs), int(agreed), interval.low, interval.high, biased))
    return agreements


def _prior(
    con: duckdb.DuckDBPyConnection, positive: int, champion_train_id: str | None, train_prior: float | None, seed: int
) -> PriorEstimate:
    from distill_pipeline.trainer.calibration import MIN_PRIOR_ESTIMATE_ROWS, estimate_prior

    listed = ", ".join(f"'{k}'" for k in BIASED_PAIRS)
    labelled, positives = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE teacher_label = {int(positive)}) FROM calls "
        f"WHERE teacher_label IS NOT NULL AND call_kind NOT IN ({listed})"
    ).fetchone()
    teacher_rate = wilson(int(positives), int(labelled)) if labelled else None
    # The EM needs the training prior the probabilities were fitted at: the champion's, on its own calls.
    em_prior, rows = None, 0
    if champion_train_id is not None and train_prior is not None:
        # confidence is the probability of the label the student gave; P(positive) follows from it.
        scores = [
            row[0]
            for row in con.execute(
                f"""
                SELECT CASE WHEN student_label = {int(positive)} THEN confidence ELSE 1 - confidence END
                FROM calls
                WHERE train_id = ? AND student_label IS NOT NULL AND confidence BETWEEN 0 AND 1
                ORDER BY hash(request_id || ?) LIMIT {PRIOR_SAMPLE_ROWS}
                """,
                [champion_train_id, str(seed)],
            ).fetchall()
        ]
        rows = len(scores)
        if rows >= MIN_PRIOR_ESTIMATE_ROWS:
            em_prior = float(estimate_prior(scores, train_prior))
    return PriorEstimate(teacher_rate, em_prior, rows, champion_train_id, train_prior)


def day_inputs(records_path: Path, task_id: str, workdir: Path) -> tuple[list[str], list[str]]:
    """Request ids and inputs of every call of the task on the day, whoever answered it, in log order."""
    con = duck.connect(workdir)
    try:
        records_view(con, records_path)
        rows = con.execute(
            "SELECT request_id, input FROM records WHERE (task IS NULL OR task = ?) AND input IS NOT NULL "
            "ORDER BY source_key, source_line",
            [task_id],
        ).fetchall()
    finally:
        con.close()
    return [str(row[0]) for row in rows], [str(row[1]) for row in rows]


def labels_for_rates(records_path: Path, labels_path: Path, workdir: Path) -> list[int]:
    """The teacher's labels of the calls it answered for a reason unrelated to the input (no ``deferred`` ones)."""
    con = duck.connect(workdir)
    try:
        records_view(con, records_path)
        listed = ", ".join(f"'{k}'" for k in BIASED_PAIRS)
        rows = con.execute(
            f"""
            SELECT l.label FROM read_parquet({duck.sql_string(str(labels_path))}) l
            LEFT JOIN records r ON r.request_id = l.request_id
            WHERE r.call_kind IS NULL OR r.call_kind NOT IN ({listed})
            ORDER BY l.source_key, l.source_line
            """
        ).fetchall()
    finally:
        con.close()
    return [int(row[0]) for row in rows]
