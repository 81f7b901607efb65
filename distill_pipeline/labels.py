"""Teacher labels from logged responses: parse each response as the task says, quarantine the rest.

Every record that comes in leaves as a labelled row or a quarantined row with its reason: the
provider returned an error, the response could not be parsed (with the parser's reason), or the
record belongs to another task. Responses repeat heavily (a classifier teacher answers in a
handful of shapes), so each distinct response text is parsed once and joined back in DuckDB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from distill_pipeline import duck
from distill_pipeline.parsing import parse_responses
from distill_pipeline.task import Task

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


def label_records(
    records_path: Path, task: Task, workdir: Path, labels_path: Path, quarantine_path: Path
) -> LabelStats:
    """Parse the label of every record in ``records_path`` (a ``raw_logs`` table)."""
    con = duck.connect(workdir)
    try:
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
            CREATE TABLE judged AS
            SELECT r.*, p.label, p.parse_method,
                CASE
                    WHEN r.task IS NOT NULL AND r.task <> {task_id} THEN 'record of another task: ' || left(r.task, 40)
                    WHEN r.error IS NOT NULL AND r.response IS NULL
                        THEN 'provider error: ' || left(r.error, {REASON_CHARS})
                    WHEN p.label IS NULL THEN 'unparseable response: ' || coalesce(p.parse_error, 'no response')
                END AS reason
            FROM records r LEFT JOIN parsed p ON r.response = p.response
            """
        )
        con.unregister("parsed")
        columns = ", ".join(LABEL_COLUMNS)
        duck.copy_to_parquet(
            con, f"SELECT {columns} FROM judged WHERE reason IS NULL ORDER BY source_key, source_line", labels_path
        )
        duck.copy_to_parquet(
            con,
            "SELECT request_id, source_key, source_line, reason, model, prompt_template_id, "
            "left(response, 300) AS response_excerpt, left(input, 300) AS input_excerpt "
            "FROM judged WHERE reason IS NOT NULL ORDER BY source_key, source_line",
            quarantine_path,
        )
        stats = LabelStats()
        stats.rows_in = con.execute("SELECT count(*) FROM judged").fetchone()[0]
        stats.with_response = con.execute(
            "SELECT count(*) FROM judged WHERE response IS NOT NULL AND (reason IS NULL OR reason LIKE 'unparseable%')"
        ).fetchone()[0]
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
