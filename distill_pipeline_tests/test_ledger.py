"""The label ledger: keys, the journal, segments in the store, recovery after a kill, damage."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_pipeline.ledger import LEDGER_SEGMENTS, Ledger, LedgerCorrupt, LedgerEntry, ledger_key, utc_now
from distill_pipeline.store import LocalStore, ObjectStore

BASE = {
    "model": "openai/gpt-4o",
    "prompt_id": "simple_prompt",
    "prompt_version": "1",
    "prompt_sha256": "abc",
    "params": {"temperature": 0.0, "max_tokens": 64},
    "task_input": "you are nice",
}


def entry(key: str, response: str = '{"is_bad": 0}', created_at: str | None = None) -> LedgerEntry:
    return LedgerEntry(
        key=key,
        model="openai/gpt-4o",
        served_model="openai/gpt-4o",
        prompt_id="simple_prompt",
        prompt_version="1",
        params={"temperature": 0.0},
        input_sha256="0" * 64,
        response=response,
        prompt_tokens=90,
        completion_tokens=9,
        cost_usd=0.0003,
        priced_by="litellm",
        latency_ms=12.0,
        created_at=created_at or utc_now(),
    )


@pytest.mark.parametrize(
    "change",
    [
        {"model": "openai/gpt-4o-mini"},
        {"prompt_id": "cot_prompt"},
        {"prompt_version": "2"},
        {"prompt_sha256": "abd"},
        {"params": {"temperature": 0.7, "max_tokens": 64}},
        {"task_input": "you are nice "},
    ],
)
def test_key_changes_with_everything_that_determines_the_answer(change):
    assert ledger_key(**BASE) != ledger_key(**(BASE | change))


def test_key_ignores_parameter_order():
    reordered = BASE | {"params": {"max_tokens": 64, "temperature": 0.0}}
    assert ledger_key(**BASE) == ledger_key(**reordered)


def test_answers_survive_close_and_reopen(any_store: ObjectStore, tmp_path: Path):
    journal = tmp_path / "journal"
    with Ledger.open(any_store, journal) as ledger:
        for i in range(3):
            ledger.record(entry(f"k{i}"))
        assert "k1" in ledger
    assert not list(journal.glob("*.jsonl")), "a closed ledger leaves nothing unpublished"
    assert any_store.list(LEDGER_SEGMENTS)
    reopened = Ledger.open(any_store, tmp_path / "elsewhere")
    assert len(reopened) == 3
    assert reopened.get("k2").cost_usd == pytest.approx(0.0003)


def test_journal_of_a_killed_run_is_recovered(tmp_path: Path):
    store = LocalStore(tmp_path / "store")
    journal = tmp_path / "journal"
    ledger = Ledger.open(store, journal, sync_every_s=3600)
    ledger.record(entry("first"))
    ledger.sync()
    ledger.record(entry("unsynced"))
    # No close: the process died here. The store has only the first answer...
    fresh = Ledger(store, tmp_path / "other")
    fresh._load()
    assert set(fresh.entries) == {"first"}
    # ...and the next run on this machine publishes the journal before it reads.
    recovered = Ledger.open(store, journal)
    assert set(recovered.entries) == {"first", "unsynced"}
    assert not list(journal.glob("*.jsonl"))
    assert set(Ledger.open(store, tmp_path / "third").entries) == {"first", "unsynced"}


def test_torn_last_line_is_ignored_and_damage_elsewhere_is_reported(tmp_path: Path):
    store = LocalStore(tmp_path / "store")
    good = entry("a").to_json() + "\n"
    store.put_bytes(LEDGER_SEGMENTS + "torn.jsonl", (good + good.replace('"a"', '"b"')[:40]).encode())
    assert set(Ledger.open(store, tmp_path / "j").entries) == {"a"}
    store.put_bytes(LEDGER_SEGMENTS + "damaged.jsonl", ("{not json\n" + good + good).encode())
    with pytest.raises(LedgerCorrupt, match=r"damaged\.jsonl: line 1"):
        Ledger.open(store, tmp_path / "j")


def test_earliest_answer_wins_when_two_runs_paid_for_one_key(tmp_path: Path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes(LEDGER_SEGMENTS + "late.jsonl", (entry("k", "late", "2026-01-02").to_json() + "\n").encode())
    store.put_bytes(LEDGER_SEGMENTS + "early.jsonl", (entry("k", "early", "2026-01-01").to_json() + "\n").encode())
    assert Ledger.open(store, tmp_path / "j").get("k").response == "early"


def test_segments_rotate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("distill_pipeline.ledger.SEGMENT_MAX_ENTRIES", 2)
    store = LocalStore(tmp_path / "store")
    with Ledger.open(store, tmp_path / "j") as ledger:
        for i in range(5):
            ledger.record(entry(f"k{i}"))
    assert len(store.list(LEDGER_SEGMENTS)) == 3
    assert len(Ledger.open(store, tmp_path / "j")) == 5
