"""Batch labelling through OpenAI-style files and batches on the test server: answers, resumption, budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import load_task
from distill_pipeline.teachers.batch import BatchJob, BatchLabeller
from distill_pipeline.teachers.client import (
    BudgetExceeded,
    ClientSettings,
    Price,
    TeacherClient,
    TeacherConfigError,
    TeacherSpec,
)
from distill_pipeline.teachers.ledger import Ledger
from distill_pipeline_tests.openai_server import control, server_stats

SPEC = TeacherSpec("openai/gpt-4o-mini", max_tokens=32)
PROMPT = load_task("toxicity").prompt("simple_prompt")
TEXTS = [f"comment {i}: you idiot" if i % 2 else f"comment {i}: thanks" for i in range(6)]


def labeller(url: str, tmp_path: Path, **settings) -> BatchLabeller:
    store = LocalStore(tmp_path / "store")
    ledger = Ledger.open(store, tmp_path / "journal")
    client = TeacherClient(ClientSettings(api_base=url + "/v1", api_key="sk-test", **settings), ledger)
    return BatchLabeller(client, store, poll_every_s=0.1, timeout_s=30)


def test_batch_answers_land_in_the_ledger_at_the_batch_price(teacher_url, tmp_path):
    control(teacher_url, batch_delay_s=0.3)
    batch = labeller(teacher_url, tmp_path)
    answers = batch.label(SPEC, PROMPT, TEXTS)
    assert [a.response for a in answers][:2] == ['```json\n{"is_bad": 0}\n```', '```json\n{"is_bad": 1}\n```']
    totals = batch.client.totals
    # Half of litellm's gpt-4o-mini price ($0.15 / $0.60 per million tokens).
    full = (totals.prompt_tokens * 0.15 + totals.completion_tokens * 0.60) / 1e6
    assert totals.paid_calls == 6 and totals.cost_usd == pytest.approx(full / 2)
    entry = batch.client.ledger.get(answers[0].key)
    assert entry.via == "batch" and entry.priced_by == "batch"
    batch.client.ledger.close()

    # The same inputs again (a chat client this time): all from the ledger, nothing asked.
    again = labeller(teacher_url, tmp_path)
    assert all(a.cached for a in again.client.label(SPEC, PROMPT, TEXTS))
    assert server_stats(teacher_url)["requests"] == 0 and server_stats(teacher_url)["batches"] == 1


def test_a_run_stopped_while_waiting_resumes_the_same_batch(teacher_url, tmp_path):
    control(teacher_url, batch_delay_s=30)
    first = labeller(teacher_url, tmp_path)
    first.timeout_s = 0.2
    with pytest.raises(TimeoutError, match="will not be submitted twice"):
        first.label(SPEC, PROMPT, TEXTS)
    first.client.ledger.close()
    control(teacher_url, batch_delay_s=0)
    second = labeller(teacher_url, tmp_path)
    answers = second.label(SPEC, PROMPT, TEXTS)
    assert all(a.response for a in answers)
    stats = server_stats(teacher_url)
    assert stats["batches"] == 1 and stats["batch_lines"] == 6 and stats["duplicate_paid"] == 0


def test_a_run_killed_before_recording_its_batch_finds_it(teacher_url, tmp_path, monkeypatch):
    control(teacher_url, batch_delay_s=0.2)
    original = BatchLabeller._save

    def crash_after_submitting(self: BatchLabeller, job: BatchJob) -> None:
        if job.status == "submitted":
            raise SystemExit("killed")
        original(self, job)

    monkeypatch.setattr(BatchLabeller, "_save", crash_after_submitting)
    with pytest.raises(SystemExit):
        labeller(teacher_url, tmp_path).label(SPEC, PROMPT, TEXTS)
    monkeypatch.setattr(BatchLabeller, "_save", original)
    answers = labeller(teacher_url, tmp_path).label(SPEC, PROMPT, TEXTS)
    assert all(a.response for a in answers)
    assert server_stats(teacher_url)["batches"] == 1


def test_a_batch_over_budget_is_not_submitted(teacher_url, tmp_path):
    batch = labeller(teacher_url, tmp_path, budget_usd=0.01, prices={"openai/gpt-4o-mini": Price(1000.0, 1000.0)})
    with pytest.raises(BudgetExceeded, match="nothing was submitted"):
        batch.label(SPEC, PROMPT, TEXTS)
    assert server_stats(teacher_url)["batches"] == 0


def test_batches_need_an_openai_style_provider(teacher_url, tmp_path):
    with pytest.raises(TeacherConfigError, match="batch labelling needs"):
        labeller(teacher_url, tmp_path).label(TeacherSpec("anthropic/claude-x"), PROMPT, TEXTS)
