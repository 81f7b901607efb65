"""The teacher client against the OpenAI-compatible test server, over HTTP through litellm.

Every test resets the server (``teacher_url``) and counts on the server's side what was asked and
paid: the client's own counters are checked against it, never trusted alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import Task, load_task
from distill_pipeline.teachers.client import (
    BudgetExceeded,
    ClientSettings,
    Price,
    RequestPacer,
    TeacherAuthError,
    TeacherClient,
    TeacherConfigError,
    TeacherSpec,
)
from distill_pipeline.teachers.ledger import Ledger
from distill_pipeline_tests.openai_server import INVALID_KEY, control, default_answer, server_stats

MODEL = "openai/gpt-4o-mini"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task("toxicity")


def inputs(n: int, tag: str = "c") -> list[str]:
    return [f"{tag} {i}: you idiot" if i % 3 == 0 else f"{tag} {i}: thanks for the edit" for i in range(n)]


def client_for(url: str, tmp_path: Path, **settings) -> TeacherClient:
    ledger = Ledger.open(LocalStore(tmp_path / "store"), tmp_path / "journal")
    defaults = {"api_base": url + "/v1", "api_key": "sk-test", "backoff_base_s": 0.05, "max_concurrency": 8}
    return TeacherClient(ClientSettings(**(defaults | settings)), ledger)


def test_labels_are_paid_once_priced_and_reused(teacher_url, tmp_path, task):
    spec = TeacherSpec(MODEL, "simple_prompt")
    texts = inputs(12) + inputs(3)  # three inputs twice: asked once
    client = client_for(teacher_url, tmp_path)
    answers = client.label(spec, task.prompt("simple_prompt"), texts)
    client.ledger.close()
    assert [a.response for a in answers[:3]] == [default_answer(f"Input text: '{t}'") for t in texts[:3]]
    assert server_stats(teacher_url)["paid"] == 12
    totals = client.totals
    assert (totals.paid_calls, totals.cache_hits, totals.failed) == (12, 0, 0)
    assert totals.prompt_tokens > 12 * 40 and totals.completion_tokens == 12 * 11
    # gpt-4o-mini is in litellm's price map: $0.15 / $0.60 per million tokens.
    expected = (totals.prompt_tokens * 0.15 + totals.completion_tokens * 0.60) / 1e6
    assert totals.cost_usd == pytest.approx(expected)
    entry = client.ledger.get(answers[0].key)
    assert entry.priced_by == "litellm" and entry.prompt_tokens > 0 and "you idiot" not in entry.to_json()

    again = client_for(teacher_url, tmp_path)
    reused = again.label(spec, task.prompt("simple_prompt"), texts)
    assert [a.response for a in reused] == [a.response for a in answers]
    assert all(a.cached for a in reused) and again.totals.calls == 0
    assert server_stats(teacher_url)["requests"] == 12


def test_a_new_prompt_or_temperature_is_a_new_call(teacher_url, tmp_path, task):
    client = client_for(teacher_url, tmp_path)
    texts = inputs(2)
    client.label(TeacherSpec(MODEL, "simple_prompt"), task.prompt("simple_prompt"), texts)
    client.label(TeacherSpec(MODEL, "simple_prompt", 0.7), task.prompt("simple_prompt"), texts)
    client.label(TeacherSpec(MODEL, "cot_prompt"), task.prompt("cot_prompt"), texts)
    assert server_stats(teacher_url)["paid"] == 6


def test_requests_per_minute_are_kept(teacher_url, tmp_path, task):
    client = client_for(teacher_url, tmp_path, rpm=1200)  # one start every 50 ms
    started = time.monotonic()
    client.label(TeacherSpec(MODEL), task.prompt("simple_prompt"), inputs(30))
    elapsed = time.monotonic() - started
    assert elapsed >= 29 * 0.05 * 0.98
    stats = server_stats(teacher_url)
    assert (stats["last_arrival"] - stats["first_arrival"]) >= 29 * 0.05 * 0.9


def test_tokens_per_minute_are_kept():
    async def run() -> float:
        pacer = RequestPacer(rpm=None, tpm=6000)  # 100 tokens/s, bucket of 1,000
        started = time.monotonic()
        for _ in range(15):
            await pacer.wait(100)
        return time.monotonic() - started

    # The first 1,000 tokens start at once, the other 500 at 100 tokens per second.
    assert 4.5 <= asyncio.run(run()) <= 6.5


def test_429_storm_loses_nothing_and_pays_nothing_twice(teacher_url, tmp_path, task):
    control(teacher_url, storm={"duration_s": 1.5, "fraction": 0.5, "retry_after_s": 0.2}, latency_ms=20)
    client = client_for(teacher_url, tmp_path, max_retries=12)
    answers = client.label(TeacherSpec(MODEL), task.prompt("simple_prompt"), inputs(40))
    stats = server_stats(teacher_url)
    assert all(a.response is not None for a in answers)
    assert stats["by_status"].get("429", 0) > 0 and client.totals.rate_limited == stats["by_status"]["429"]
    assert stats["paid"] == stats["distinct_paid"] == 40 and stats["duplicate_paid"] == 0


def test_retry_after_pauses_every_request(teacher_url, tmp_path, task):
    control(teacher_url, storm={"duration_s": 10, "fraction": 1.0, "retry_after_s": 0.6})
    client = client_for(teacher_url, tmp_path, max_retries=1)
    started = time.monotonic()
    answers = client.label(TeacherSpec(MODEL), task.prompt("simple_prompt"), inputs(4))
    # The first 429 pauses the pool: the retries wait for Retry-After rather than hammering.
    assert time.monotonic() - started >= 0.6
    assert all(a.error and "RateLimitError" in a.error for a in answers)
    assert server_stats(teacher_url)["requests"] <= 8


def test_server_errors_are_retried(teacher_url, tmp_path, task):
    control(teacher_url, errors={"count": 3, "status": 503})
    client = client_for(teacher_url, tmp_path, max_concurrency=1)
    answers = client.label(TeacherSpec(MODEL), task.prompt("simple_prompt"), inputs(3))
    assert all(a.response for a in answers)
    assert client.totals.server_errors == 3 and client.totals.retries == 3


def test_failure_goes_to_the_fallback_model(teacher_url, tmp_path, task):
    control(teacher_url, missing_models=["retired-model"])
    client = client_for(teacher_url, tmp_path)
    spec = TeacherSpec("openai/retired-model", fallback_model=MODEL)
    answers = client.label(spec, task.prompt("simple_prompt"), inputs(3))
    assert all(a.response and a.served_model == MODEL for a in answers)
    assert client.totals.fallback_calls == 3
    # The answer is the configured teacher's (its key), served by the fallback (recorded).
    assert client.ledger.get(answers[0].key).served_model == MODEL


def test_a_failed_input_is_reported_not_kept(teacher_url, tmp_path, task):
    control(teacher_url, missing_models=["retired-model"])
    client = client_for(teacher_url, tmp_path)
    answers = client.label(TeacherSpec("openai/retired-model"), task.prompt("simple_prompt"), inputs(2))
    assert all(a.response is None and "NotFoundError" in a.error for a in answers)
    assert client.totals.failed == 2 and len(client.ledger) == 0
    assert "sk-test" not in answers[0].error


def test_a_refused_key_stops_the_run_without_showing_the_key(teacher_url, tmp_path, task):
    client = client_for(teacher_url, tmp_path, api_key=INVALID_KEY, max_concurrency=1)
    with pytest.raises(TeacherAuthError, match="refused the API key") as raised:
        client.label(TeacherSpec(MODEL), task.prompt("simple_prompt"), inputs(5))
    assert INVALID_KEY not in str(raised.value)
    # The first refusal ends the run: no retries against a key that will not work.
    assert server_stats(teacher_url)["requests"] == 1


def test_budget_stops_before_overspending_and_keeps_what_was_paid(teacher_url, tmp_path, task):
    prices = {"openai/priced-teacher": Price(1000.0, 1000.0)}  # about $0.07 a call
    spec = TeacherSpec("openai/priced-teacher", max_tokens=16)
    texts = inputs(20)
    client = client_for(teacher_url, tmp_path, budget_usd=0.5, prices=prices, max_concurrency=2)
    with pytest.raises(BudgetExceeded, match=r"budget of \$0.5000 reached") as raised:
        client.label(spec, task.prompt("simple_prompt"), texts)
    client.ledger.close()
    paid = server_stats(teacher_url)["paid"]
    assert 0 < paid < 20 and raised.value.totals.cost_usd <= 0.5
    assert raised.value.totals.paid_calls == paid

    resumed = client_for(teacher_url, tmp_path, budget_usd=5.0, prices=prices)
    answers = resumed.label(spec, task.prompt("simple_prompt"), texts)
    assert all(a.response for a in answers)
    assert resumed.totals.cache_hits == paid and resumed.totals.paid_calls == 20 - paid
    assert server_stats(teacher_url)["duplicate_paid"] == 0


def test_budget_needs_a_price(teacher_url, tmp_path, task):
    client = client_for(teacher_url, tmp_path, budget_usd=1.0)
    with pytest.raises(TeacherConfigError, match="has no price"):
        client.label(TeacherSpec("openai/unknown-teacher"), task.prompt("simple_prompt"), inputs(1))
    assert server_stats(teacher_url)["requests"] == 0


_LABEL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from distill_pipeline.teachers.ledger import Ledger
    from distill_pipeline.core.store import LocalStore
    from distill_pipeline.core.task import load_task
    from distill_pipeline.teachers.client import ClientSettings, TeacherClient, TeacherSpec

    url, root, texts = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    ledger = Ledger.open(LocalStore(root / "store"), root / "journal", sync_every_s=3600)
    client = TeacherClient(ClientSettings(api_base=url + "/v1", api_key="sk-test", max_concurrency=1), ledger)
    client.label(TeacherSpec("openai/gpt-4o-mini"), load_task("toxicity").prompt("simple_prompt"), texts)
    ledger.close()
    """
)


def test_a_killed_run_resumes_without_paying_twice(teacher_url, tmp_path, task):
    control(teacher_url, latency_ms=40)
    texts = inputs(60)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", _LABEL_SCRIPT, teacher_url, str(tmp_path), json.dumps(texts)],
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while server_stats(teacher_url)["paid"] < 15:
            assert process.poll() is None, "the labelling run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    paid_before = server_stats(teacher_url)["paid"]
    assert paid_before < 60

    resumed = client_for(teacher_url, tmp_path)
    recovered = len(resumed.ledger)
    answers = resumed.label(TeacherSpec(MODEL), task.prompt("simple_prompt"), texts)
    stats = server_stats(teacher_url)
    assert all(a.response for a in answers)
    # Every answer the killed run received was kept; at most the one call in flight when it died
    # (answered by the server, never received) is paid again.
    assert recovered >= paid_before - 1
    assert resumed.totals.cache_hits == recovered and resumed.totals.paid_calls == 60 - recovered
    assert stats["distinct_paid"] == 60 and stats["duplicate_paid"] <= 1
