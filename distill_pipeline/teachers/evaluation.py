"""Which teacher to distil from: a leaderboard of teacher × prompt × temperature on gold labels.

The playbook's first rule is to maximise the quality of the teacher before distilling: every
mistake it makes is copied. Each configuration answers the same gold-labelled test sets through
the :class:`~distill_pipeline.teachers.client.TeacherClient` (so a configuration already asked is free),
its answers are parsed as the task says, and it is scored per test set: accuracy against gold
(an answer that gives no label counts as wrong: the pipeline would quarantine the row), the
parse-failure rate, and what 1,000 answers cost. The recommendation is the most accurate
configuration on average over the test sets, or a cheaper one within ``tolerance`` of it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill_pipeline.core import duck
from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.core.task import LabelSpec, Task
from distill_pipeline.data.gold import GOLD_LABEL, GOLD_SET, GOLD_TEXT, GoldTableError
from distill_pipeline.data.parsing import parse_responses
from distill_pipeline.teachers.client import TeacherClient, TeacherSpec

DEFAULT_TOLERANCE = 0.005


@dataclass(frozen=True)
class GoldSet:
    """One test set's inputs with their gold (human) labels."""

    name: str
    inputs: list[str]
    gold: list[int]

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.gold):
            raise ValueError(f"gold set {self.name!r}: {len(self.inputs)} inputs but {len(self.gold)} labels")


@dataclass(frozen=True)
class SetScore:
    rows: int
    correct: int
    answered: int
    parse_failures: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.rows if self.rows else 0.0

    @property
    def parse_failure_rate(self) -> float:
        return self.parse_failures / self.answered if self.answered else 0.0


@dataclass(frozen=True)
class ConfigScore:
    """One teacher configuration's scores on every test set, and its cost."""

    model: str
    prompt_id: str
    temperature: float | None
    sets: dict[str, SetScore]
    cost_usd: float | None
    answers_priced: int

    @property
    def name(self) -> str:
        temperature = "default" if self.temperature is None else f"{self.temperature:g}"
        return f"{self.model} / {self.prompt_id} / T={temperature}"

    @property
    def mean_accuracy(self) -> float:
        """Mean accuracy over the test sets it has rows in."""
        scored = [s.accuracy for s in self.sets.values() if s.rows]
        return sum(scored) / len(scored) if scored else 0.0

    @property
    def parse_failure_rate(self) -> float:
        answered = sum(s.answered for s in self.sets.values())
        return sum(s.parse_failures for s in self.sets.values()) / answered if answered else 0.0

    @property
    def cost_per_1000(self) -> float | None:
        if self.cost_usd is None or not self.answers_priced:
            return None
        return self.cost_usd / self.answers_priced * 1000


@dataclass(frozen=True)
class Leaderboard:
    scores: list[ConfigScore]
    recommended: ConfigScore | None
    reason: str
    set_names: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def entry(score: ConfigScore) -> dict[str, Any]:
            return {
                "configuration": score.name,
                "model": score.model,
                "prompt_id": score.prompt_id,
                "temperature": score.temperature,
                "mean_accuracy": score.mean_accuracy,
                "parse_failure_rate": score.parse_failure_rate,
                "cost_per_1000_usd": score.cost_per_1000,
                "sets": {
                    name: {**asdict(s), "accuracy": s.accuracy, "parse_failure_rate": s.parse_failure_rate}
                    for name, s in score.sets.items()
                },
            }

        return {
            "leaderboard": [entry(s) for s in self.scores],
            "recommended": entry(self.recommended) if self.recommended else None,
            "reason": self.reason,
        }

    def markdown(self) -> str:
        columns = ["rank", "teacher / prompt / temperature"]
        columns += [f"accuracy: {name} (rows)" for name in self.set_names]
        columns += ["mean accuracy", "parse failures", "cost per 1,000"]
        rows = []
        for rank, score in enumerate(self.scores, 1):
            cost = score.cost_per_1000
            row = [rank, score.name]
            for name in self.set_names:
                s = score.sets.get(name)
                row.append(f"{s.accuracy:.1%} ({s.rows:,})" if s and s.rows else "—")
            row += [
                f"{score.mean_accuracy:.1%}",
                f"{score.parse_failure_rate:.1%}",
                "—" if cost is None else f"${cost:.3f}",
            ]
            rows.append(row)
        return markdown_table(rows, columns) + f"\n\n**Recommended:** {self.reason}\n"


def score_responses(label: LabelSpec, gold: Sequence[int], responses: Sequence[str | None]) -> SetScore:
    """One configuration's answers to one gold set, scored (no answer or no label counts as wrong)."""
    parsed = parse_responses(responses, label)
    answered = sum(1 for r in responses if r is not None)
    failures = sum(1 for r, p in zip(responses, parsed, strict=True) if r is not None and p.label is None)
    correct = sum(1 for g, p in zip(gold, parsed, strict=True) if p.label is not None and p.label == int(g))
    return SetScore(len(gold), correct, answered, failures)


def recommend(
    scores: Sequence[ConfigScore], set_names: Sequence[str], tolerance: float = DEFAULT_TOLERANCE
) -> tuple[ConfigScore | None, str]:
    """The most accurate configuration, or the cheapest within ``tolerance`` of it, and why.

    Only configurations scored on every test set compete: a mean over fewer sets is not the
    same number.
    """
    complete = [s for s in scores if all(s.sets.get(name) and s.sets[name].rows for name in set_names)]
    if not complete:
        return None, "no configuration was evaluated on every test set"
    scores = complete
    best = max(scores, key=lambda s: s.mean_accuracy)
    close = [s for s in scores if best.mean_accuracy - s.mean_accuracy <= tolerance and s.cost_per_1000 is not None]
    cheaper = min(close, key=lambda s: s.cost_per_1000 or 0.0, default=best)
    if cheaper is not best and best.cost_per_1000 is not None and (cheaper.cost_per_1000 or 0.0) < best.cost_per_1000:
        return cheaper, (
            f"{cheaper.name}: mean accuracy {cheaper.mean_accuracy:.1%}, within {tolerance:.1%} of the best "
            f"({best.name}, {best.mean_accuracy:.1%}) at ${cheaper.cost_per_1000:.3f} rather than "
            f"${best.cost_per_1000:.3f} per 1,000 answers"
        )
    return best, f"{best.name}: the highest mean accuracy over the test sets ({best.mean_accuracy:.1%})"


def rank(scores: Sequence[ConfigScore], tolerance: float = DEFAULT_TOLERANCE) -> Leaderboard:
    # Configurations scored on more test sets rank first: a mean over fewer (smaller) sets is not
    # the same number, and a perfect score on a handful of rows should not top the board.
    ordered = sorted(
        scores,
        key=lambda s: (
            -sum(1 for x in s.sets.values() if x.rows),
            -s.mean_accuracy,
            s.parse_failure_rate,
            s.cost_per_1000 or 0.0,
        ),
    )
    names = sorted({name for s in scores for name in s.sets})
    chosen, reason = recommend(ordered, names, tolerance)
    return Leaderboard(ordered, chosen, reason, names)


def grid(
    models: Sequence[str], prompt_ids: Sequence[str], temperatures: Sequence[float], max_tokens: int
) -> list[TeacherSpec]:
    """Every teacher × prompt × temperature configuration."""
    return [
        TeacherSpec(model, prompt_id, float(temperature), max_tokens)
        for model, prompt_id, temperature in itertools.product(models, prompt_ids, temperatures)
    ]


def evaluate_teachers(
    client: TeacherClient,
    specs: Sequence[TeacherSpec],
    task: Task,
    sets: Sequence[GoldSet],
    tolerance: float = DEFAULT_TOLERANCE,
) -> Leaderboard:
    """Ask every configuration every gold input (from the ledger where it can) and rank them."""
    scores = []
    for spec in specs:
        template = task.prompt(spec.prompt_id)
        per_set = {}
        cost, priced = 0.0, 0
        unpriced = False
        for gold_set in sets:
            answers = client.label(spec, template, gold_set.inputs)
            per_set[gold_set.name] = score_responses(task.label, gold_set.gold, [a.response for a in answers])
            for answer in answers:
                entry = client.ledger.get(answer.key) if answer.response is not None else None
                if entry is None:
                    continue
                if entry.cost_usd is None:
                    unpriced = True
                else:
                    cost += entry.cost_usd
                    priced += 1
        scores.append(
            ConfigScore(spec.model, spec.prompt_id, spec.temperature, per_set, None if unpriced else cost, priced)
        )
    return rank(scores, tolerance)


def load_gold_sets(
    gold_path: Path,
    test_sets: Mapping[str, Path],
    label_values: Sequence[int],
    *,
    max_rows_per_set: int,
    seed: int,
    workdir: Path,
) -> list[GoldSet]:
    """Gold sets from a table of ``input`` and ``gold_label`` (Parquet, CSV or JSONL).

    With a ``test_set`` column the table names its own sets; otherwise each frozen test set
    becomes a gold set of its rows that the table labels (matched by exact input). Each set is
    capped at a seeded sample of ``max_rows_per_set`` rows: teacher evaluation costs money.
    """
    con = duck.connect(workdir)
    try:
        reader = {".parquet": "read_parquet", ".csv": "read_csv_auto", ".jsonl": "read_json_auto"}.get(
            gold_path.suffix.lower()
        )
        if reader is None:
            raise GoldTableError(f"gold table {gold_path.name}: use Parquet, CSV or JSONL")
        con.execute(f"CREATE VIEW gold AS SELECT * FROM {reader}({duck.sql_string(str(gold_path))})")
        columns = {row[0] for row in con.execute("DESCRIBE gold").fetchall()}
        if not {GOLD_TEXT, GOLD_LABEL} <= columns:
            raise GoldTableError(f"gold table needs columns {GOLD_TEXT!r} and {GOLD_LABEL!r}; it has {sorted(columns)}")
        allowed = ", ".join(str(int(v)) for v in label_values)
        bad = con.execute(
            f"SELECT DISTINCT {GOLD_LABEL} FROM gold WHERE {GOLD_LABEL} IS NULL OR {GOLD_LABEL}::VARCHAR NOT IN "
            f"({', '.join(duck.sql_string(str(int(v))) for v in label_values)}) LIMIT 5"
        ).fetchall()
        if bad:
            raise GoldTableError(f"gold labels outside the task's values ({allowed}): {[row[0] for row in bad]}")
        rank_sql = duck.seeded_hash_sql(GOLD_TEXT, seed, "teacher_eval")
        if GOLD_SET in columns:
            sources = {
                str(name): f"SELECT {GOLD_TEXT}, {GOLD_LABEL} FROM gold WHERE {GOLD_SET} = {duck.sql_string(str(name))}"
                for (name,) in con.execute(f"SELECT DISTINCT {GOLD_SET} FROM gold ORDER BY 1").fetchall()
            }
        else:
            sources = {
                name: f"SELECT t.input, g.{GOLD_LABEL} FROM read_parquet({duck.sql_string(str(path))}) t "
                f"JOIN (SELECT {GOLD_TEXT}, any_value({GOLD_LABEL}) AS {GOLD_LABEL} FROM gold GROUP BY 1) g "
                f"ON t.input = g.{GOLD_TEXT}"
                for name, path in test_sets.items()
            }
        sets = []
        for name, source in sources.items():
            rows = con.execute(
                f"SELECT {GOLD_TEXT}, {GOLD_LABEL}::BIGINT FROM ({source}) "
                f"ORDER BY {rank_sql} LIMIT {int(max_rows_per_set)}"
            ).fetchall()
            if rows:
                sets.append(GoldSet(name, [r[0] for r in rows], [int(r[1]) for r in rows]))
        if not sets:
            raise GoldTableError("no gold-labelled rows: none of the gold table's inputs is in a test set")
        return sets
    finally:
        con.close()
