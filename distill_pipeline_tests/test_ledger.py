"""The label ledger: keys, the journal, segments in the store, recovery after a kill, damage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
import pytest

from distill_pipeline.core.store import LocalStore, ObjectStore
from distill_pipeline.defs.core.resources import StoreResource
from distill_pipeline.defs.teachers.ledger import label_ledger
from distill_pipeline.teachers.ledger import (
    LEDGER_SEGMENTS,
    Ledger,
    LedgerCorrupt,
    LedgerEntry,
    compact_ledger,
    ledger_key,
    load_entries,
    utc_now,
)

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
    monkeypatch.setattr("distill_pipeline.teachers.ledger.SEGMENT_MAX_ENTRIES", 2)
    store = LocalStore(tmp_path / "store")
    with Ledger.open(store, tmp_path / "j") as ledger:
        for i in range(5):
            ledger.record(entry(f"k{i}"))
    assert len(store.list(LEDGER_SEGMENTS)) == 3
    assert len(Ledger.open(store, tmp_path / "j")) == 5


def _segment(store: ObjectStore, name: str, *entries: LedgerEntry) -> str:
    key = f"{LEDGER_SEGMENTS}{name}.jsonl"
    store.put_bytes(key, "".join(e.to_json() + "\n" for e in entries).encode())
    return key


def test_compaction_merges_settled_segments_and_loses_no_answer(local_store: LocalStore):
    early, late = "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"
    first = _segment(local_store, "a", entry("k1", "first", early), entry("k2"))
    second = _segment(local_store, "b", entry("k1", "second", late), entry("k3"))
    before = load_entries(local_store)
    live = _segment(local_store, "c", entry("k4"))  # a running job's segment, written a moment ago
    result = compact_ledger(local_store, min_age_s=60, now=time.time() + 30)
    assert (result.segments_before, result.merged, result.deleted, result.duplicates_dropped) == (3, 0, 0, 0)

    for key in (first, second):
        os.utime(local_store.root / key, (0, 0))
    result = compact_ledger(local_store, min_age_s=60)
    assert (result.merged, result.deleted, result.entries, result.duplicates_dropped) == (2, 2, 3, 1)
    remaining = sorted(info.key for info in local_store.list(LEDGER_SEGMENTS))
    assert remaining == sorted([result.compacted_key, live])
    after = load_entries(local_store)
    assert after["k1"].response == "first" and set(after) == set(before) | {"k4"}


def test_a_segment_rewritten_while_compacting_is_kept(local_store: LocalStore):
    class WriterWakesUp(LocalStore):
        """A run syncs its segment again between compaction's read and its delete."""

        def get_bytes(self, key: str) -> bytes:
            data = super().get_bytes(key)
            if key.endswith("b.jsonl") and b"k9" not in data:
                super().put_bytes(key, data + (entry("k9").to_json() + "\n").encode())
            return data

    store = WriterWakesUp(local_store.root)
    _segment(store, "a", entry("k1"))
    rewritten = _segment(store, "b", entry("k2"))
    result = compact_ledger(store, min_age_s=0)
    assert result.kept_changed == (rewritten,) and result.deleted == 1
    assert set(load_entries(store)) == {"k1", "k2", "k9"}


def test_label_ledger_asset_compacts_and_reports_spend_per_model(local_store: LocalStore):
    for name in ("a", "b", "c"):
        key = _segment(local_store, name, entry(f"k-{name}"), entry("shared", created_at="2026-01-01T00:00:00+00:00"))
        os.utime(local_store.root / key, (0, 0))
    result = dg.materialize(
        [label_ledger],
        resources={"store": StoreResource(url=local_store.url)},
        run_config={"ops": {"label_ledger": {"config": {"min_age_s": 60}}}},
    )
    (materialization,) = result.asset_materializations_for_node("label_ledger")
    meta = {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    assert (meta["answers"], meta["segments_before"], meta["segments_after"], meta["duplicates_dropped"]) == (
        4,
        3,
        1,
        2,
    )
    assert meta["cost_usd"] == pytest.approx(4 * 0.0003)
    assert "| openai/gpt-4o | 4 | 360 | 36 | $0.0012 | 0 |" in meta["by_model"]
