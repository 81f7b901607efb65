"""Asking the configured teachers for labels: one verdict per distinct input, voted when several.

Each teacher answers every input through the :class:`~distill_pipeline.teachers.client.TeacherClient`
(so from the ledger where it can), its answers are parsed as the task says, and the labels are
combined by majority vote. The verdict table (one row per input, columns
:data:`~distill_pipeline.data.labels.VERDICT_COLUMNS`) feeds ``label_records``; the per-teacher
summary says how each teacher did against the majority.

Calls the student served alone have no teacher answer; their inputs are ``optional``: asked after
the required ones, and when the budget runs out among them the run keeps what was paid (the
ledger has it) and leaves the rest unlabelled instead of failing, since no label is missing that
the logs ever had.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from distill_pipeline.core.task import PromptTemplate, Task
from distill_pipeline.data.parsing import ParseResult, parse_responses
from distill_pipeline.teachers.client import Answer, BudgetExceeded, RunTotals, TeacherClient, TeacherSpec
from distill_pipeline.teachers.soft import from_json_keys, vote_distribution
from distill_pipeline.teachers.voting import majority_vote

RESPONSE_EXCERPT_CHARS = 300


@dataclass(frozen=True)
class TeacherSummary:
    """How one teacher did on one run's inputs."""

    teacher: str
    inputs: int
    answered: int
    labelled: int
    agrees_with_majority: int
    calls: int
    cache_hits: int
    cost_usd: float

    @property
    def parse_rate(self) -> float:
        return self.labelled / self.answered if self.answered else 0.0


@dataclass(frozen=True)
class Verdicts:
    table: pa.Table
    teachers: list[TeacherSummary]
    totals: RunTotals
    #: Optional (student-served) inputs left without a verdict because the budget ran out.
    unasked: int = 0


def _reason(answers: Sequence[Answer], parsed: Sequence[ParseResult], specs: Sequence[TeacherSpec]) -> str:
    """Why no teacher gave a label: the first unparseable answer, else the first error."""
    for spec, answer, result in zip(specs, answers, parsed, strict=True):
        if answer.response is not None:
            return f"unparseable response: {result.error} ({spec.model})"
    errors = [f"{spec.model}: {answer.error}" for spec, answer in zip(specs, answers, strict=True)]
    return "provider error: " + "; ".join(errors)[:300]


Labeller = Callable[[TeacherSpec, PromptTemplate, Sequence[str]], list[Answer]]


def ask_teachers(
    client: TeacherClient,
    specs: Sequence[TeacherSpec],
    task: Task,
    inputs: Sequence[str],
    *,
    labeller: Labeller | None = None,
    optional: Sequence[str] = (),
) -> Verdicts:
    """Every teacher's answer to every input, parsed and voted into one verdict per input.

    ``labeller`` answers one teacher's inputs (default: ``client.label``, one chat call each; a
    :class:`~distill_pipeline.teachers.batch.BatchLabeller`'s ``label`` goes through the batch API).
    ``optional`` inputs (those of student-served calls) are asked after ``inputs``; one that not
    every teacher answered before the budget ran out gets no verdict row (``Verdicts.unasked``).
    """
    # Chat calls carry the label spec, so that a teacher asked for log-probabilities gives each
    # answer's label distribution; the batch API returns none.
    label = labeller or functools.partial(_label_with_distributions, client, task)
    if not specs:
        raise ValueError("no teachers configured: name at least one litellm model")
    required = list(inputs)
    answered: list[list[Answer | None]] = []
    summaries_totals: list[RunTotals] = []
    for spec in specs:
        template = task.prompt(spec.prompt_id)
        before = RunTotals(**client.totals.as_dict())
        teacher_answers: list[Answer | None] = list(label(spec, template, required))
        if optional:
            teacher_answers += _within_budget(client, label, spec, template, optional)
        answered.append(teacher_answers)
        spent = RunTotals(**client.totals.as_dict())
        for name, value in before.as_dict().items():
            setattr(spent, name, getattr(spent, name) - value)
        summaries_totals.append(spent)
    asked = [*required, *optional]
    complete = [row for row in range(len(asked)) if all(teacher[row] is not None for teacher in answered)]
    inputs = [asked[row] for row in complete]
    answers = [[answer for row in complete if (answer := teacher[row]) is not None] for teacher in answered]
    parsed = [parse_responses([a.response for a in teacher], task.label) for teacher in answers]

    columns: dict[str, list] = {name: [] for name in ("input", "t_label", "t_method", "t_agreement", "t_votes")}
    columns |= {"t_tied": [], "t_detail": [], "t_response": [], "t_reason": [], "t_soft": []}
    positive = task.label.positive if len(task.label.values) == 2 else None
    agrees = [0] * len(specs)
    for row, text in enumerate(inputs):
        row_answers = [teacher[row] for teacher in answers]
        row_parsed = [teacher[row] for teacher in parsed]
        vote = majority_vote([result.label for result in row_parsed])
        for i, result in enumerate(row_parsed):
            agrees[i] += int(vote.label is not None and result.label == vote.label)
        columns["input"].append(text)
        columns["t_label"].append(vote.label)
        columns["t_method"].append(None if vote.label is None else ("vote" if len(specs) > 1 else row_parsed[0].method))
        columns["t_agreement"].append(vote.agreement if vote.votes else None)
        columns["t_votes"].append(vote.votes)
        columns["t_tied"].append(vote.tied)
        columns["t_detail"].append(
            json.dumps(
                [
                    {
                        "teacher": spec.name,
                        "label": result.label,
                        "served_by": answer.served_model,
                        "response": None if answer.response is None else answer.response[:RESPONSE_EXCERPT_CHARS],
                        "error": answer.error,
                    }
                    for spec, answer, result in zip(specs, row_answers, row_parsed, strict=True)
                ],
                ensure_ascii=False,
            )
        )
        first = next((a.response for a in row_answers if a.response is not None), None)
        columns["t_response"].append(first)
        columns["t_reason"].append(None if vote.label is not None else _reason(row_answers, row_parsed, specs))
        soft = None
        if positive is not None:
            given = [from_json_keys(answer.label_distribution, task.label) for answer in row_answers]
            # One teacher without a distribution says nothing soft: its vote alone is no share.
            if len(specs) > 1 or given[0] is not None:
                distribution = vote_distribution([r.label for r in row_parsed], task.label.values, given)
                soft = None if distribution is None else distribution[positive]
        columns["t_soft"].append(soft)
    single = len(specs) == 1
    model = specs[0].model if single else "vote: " + ", ".join(spec.model for spec in specs)
    prompt_ids = sorted({spec.prompt_id for spec in specs})
    versions = sorted({task.prompt(spec.prompt_id).version for spec in specs})
    n = len(inputs)
    table = pa.table(
        {
            "input": pa.array(columns["input"], pa.string()),
            "t_label": pa.array(columns["t_label"], pa.int64()),
            "t_method": pa.array(columns["t_method"], pa.string()),
            "t_model": pa.array([model] * n, pa.string()),
            "t_prompt_id": pa.array([",".join(prompt_ids)] * n, pa.string()),
            "t_prompt_version": pa.array([",".join(versions)] * n, pa.string()),
            "t_agreement": pa.array(columns["t_agreement"], pa.float64()),
            "t_votes": pa.array(columns["t_votes"], pa.int64()),
            "t_tied": pa.array(columns["t_tied"], pa.bool_()),
            "t_detail": pa.array(columns["t_detail"], pa.string()),
            "t_response": pa.array(columns["t_response"], pa.string()),
            "t_reason": pa.array(columns["t_reason"], pa.string()),
            "t_soft": pa.array(columns["t_soft"], pa.float64()),
        }
    )
    summaries = [
        TeacherSummary(
            teacher=spec.name,
            inputs=n,
            answered=sum(1 for a in answers[i] if a.response is not None),
            labelled=sum(1 for r in parsed[i] if r.label is not None),
            agrees_with_majority=agrees[i],
            calls=summaries_totals[i].paid_calls,
            cache_hits=summaries_totals[i].cache_hits,
            cost_usd=summaries_totals[i].cost_usd,
        )
        for i, spec in enumerate(specs)
    ]
    return Verdicts(table, summaries, client.totals, unasked=len(asked) - len(inputs))


def _within_budget(
    client: TeacherClient, label: Labeller, spec: TeacherSpec, template: PromptTemplate, inputs: Sequence[str]
) -> list[Answer | None]:
    """``inputs`` answered as far as the budget goes: past it, what the ledger holds, else None."""
    try:
        return list(label(spec, template, inputs))
    except BudgetExceeded:
        pass
    answers: list[Answer | None] = []
    for key in client.keys_for(spec, template, inputs):
        entry = client.ledger.get(key)
        answers.append(
            None
            if entry is None
            else Answer(key, entry.response, None, True, entry.served_model, entry.label_distribution)
        )
    return answers


def _label_with_distributions(
    client: TeacherClient, task: Task, spec: TeacherSpec, template: PromptTemplate, inputs: Sequence[str]
) -> list[Answer]:
    return client.label(spec, template, inputs, task.label)
