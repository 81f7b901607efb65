"""The label ledger: every paid teacher answer, kept so that no call is ever paid for twice.

An entry is keyed by the SHA-256 of what determines the answer: the teacher model, the prompt
template (id, version and the template text's own hash, so an edit without a version bump is
still a new prompt), the sampling parameters and the input. A labelling run looks each key up
first and calls the teacher only for keys it lacks, so a re-run over the same data makes zero
calls.

Durability has two layers, because answers arrive faster than an object store should be written:

- a local **journal**: each answer is appended to a JSONL file and flushed to the OS the moment
  it arrives, so a killed process (SIGKILL included) loses nothing it paid for;
- **segments** in the store (``ledger/segments/<segment>.jsonl``): the journal is copied there
  every ``sync_every_s`` seconds and when the ledger closes, which makes the answers visible to
  every other run and machine. On open, journal files a killed run left behind are uploaded
  first. A journal on a disk that does not outlive the process (a pod without a volume) can
  lose only the answers of the last sync interval.

Each run writes its own segments, so concurrent runs (several day partitions at once) never
write the same object; if two runs pay for the same key at once, both entries are kept and the
earliest wins on read. :func:`compact_ledger` merges settled segments into one, so the number of
objects an open reads stays small. Inputs are not stored, only their hash: the ledger outlives curation's
PII scrubbing and must not become a second copy of the users' text.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distill_pipeline.core.layout import LEDGER_ROOT
from distill_pipeline.core.store import ObjectNotFound, ObjectStore

LEDGER_SEGMENTS = f"{LEDGER_ROOT}segments/"
#: A segment is re-uploaded whole at each sync; starting a new one bounds what a sync rewrites.
SEGMENT_MAX_ENTRIES = 5_000
DEFAULT_SYNC_EVERY_S = 2.0


def input_sha256(task_input: str) -> str:
    """The hash a ledger entry keeps instead of its input (the entry never holds the users' text)."""
    return hashlib.sha256(task_input.encode()).hexdigest()


def ledger_key(
    *, model: str, prompt_id: str, prompt_version: str, prompt_sha256: str, params: dict[str, Any], task_input: str
) -> str:
    """The key of one teacher call: everything that determines its answer, hashed."""
    identity = {
        "model": model,
        "prompt_id": prompt_id,
        "prompt_version": prompt_version,
        "prompt_sha256": prompt_sha256,
        "params": params,
        "input_sha256": input_sha256(task_input),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    """One paid answer: what was asked (hashed), what came back, and what it cost."""

    key: str
    model: str
    served_model: str
    prompt_id: str
    prompt_version: str
    params: dict[str, Any]
    input_sha256: str
    response: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    # "litellm" (its price map), "table" (the configured prices), "batch" (batch price) or None.
    priced_by: str | None
    latency_ms: float
    created_at: str
    via: str = "chat"
    # The teacher's probability per label value, when it was asked for log-probabilities.
    label_distribution: dict[str, float] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> LedgerEntry:
        raw = json.loads(line)
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__ if name in raw})


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def default_journal_dir(store: ObjectStore) -> Path:
    """A journal folder per store that survives the process (``$DISTILL_LEDGER_JOURNAL`` overrides)."""
    chosen = os.environ.get("DISTILL_LEDGER_JOURNAL")
    if chosen:
        return Path(chosen).expanduser()
    tag = hashlib.sha256(store.url.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"distill-ledger-{tag}"


def _read_entries(data: bytes, source: str) -> list[LedgerEntry]:
    entries = []
    lines = data.decode("utf-8", errors="replace").split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.from_json(line))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            # A process killed mid-write leaves at most a torn last line; anything else is damage.
            if number >= len(lines) - 2:
                continue
            raise LedgerCorrupt(f"{source}: line {number + 1} is not a ledger entry ({exc})") from exc
    return entries


def _keep_earliest(entries: Iterable[LedgerEntry], into: dict[str, LedgerEntry]) -> int:
    """Add entries to ``into``, the earliest answer winning per key; returns how many were read."""
    read = 0
    for entry in entries:
        read += 1
        known = into.get(entry.key)
        if known is None or entry.created_at < known.created_at:
            into[entry.key] = entry
    return read


def load_entries(store: ObjectStore) -> dict[str, LedgerEntry]:
    """Every answer the store's ledger holds, the earliest per key."""
    entries: dict[str, LedgerEntry] = {}
    for info in store.list(LEDGER_SEGMENTS):
        if info.key.endswith(".jsonl"):
            _keep_earliest(_read_entries(store.get_bytes(info.key), info.key), entries)
    return entries


class LedgerCorrupt(RuntimeError):
    """A ledger segment has a damaged line that is not a torn last line."""


class Ledger:
    """The persistent answer cache; open with :meth:`open`, close to publish the last answers."""

    def __init__(self, store: ObjectStore, journal_dir: Path, *, sync_every_s: float = DEFAULT_SYNC_EVERY_S) -> None:
        self.store = store
        self.journal_dir = journal_dir
        self.sync_every_s = sync_every_s
        self.entries: dict[str, LedgerEntry] = {}
        self._segment: str | None = None
        self._segment_entries = 0
        self._journal: Any = None
        self._dirty = False
        self._last_sync = time.monotonic()
        self._segments_written: list[str] = []

    @classmethod
    def open(
        cls, store: ObjectStore, journal_dir: Path | None = None, *, sync_every_s: float = DEFAULT_SYNC_EVERY_S
    ) -> Ledger:
        ledger = cls(store, journal_dir or default_journal_dir(store), sync_every_s=sync_every_s)
        ledger._recover_journals()
        ledger._load()
        return ledger

    # ---------------------------------------------------------------- reading
    def _recover_journals(self) -> None:
        """Publish what runs killed before their last sync left in the journal folder."""
        if not self.journal_dir.is_dir():
            return
        for path in sorted(self.journal_dir.glob("*.jsonl")):
            data = path.read_bytes()
            key = LEDGER_SEGMENTS + path.name
            try:
                published = self.store.get_bytes(key)
            except ObjectNotFound:
                published = b""
            if len(published) < len(data):
                self.store.put_bytes(key, data)
            path.unlink()

    def _load(self) -> None:
        self.entries = load_entries(self.store)

    def get(self, key: str) -> LedgerEntry | None:
        return self.entries.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    # ---------------------------------------------------------------- writing
    def _new_segment(self) -> None:
        self._close_journal()
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        self._segment = f"{stamp}-{uuid.uuid4().hex[:12]}.jsonl"
        self._segment_entries = 0
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self._journal = open(self.journal_dir / self._segment, "a", encoding="utf-8")  # noqa: SIM115
        self._segments_written.append(self._segment)

    def record(self, entry: LedgerEntry) -> None:
        """Keep a paid answer: in the journal at once, in the store at the next sync."""
        if self._journal is None or self._segment_entries >= SEGMENT_MAX_ENTRIES:
            if self._journal is not None:
                self.sync()
            self._new_segment()
        self._journal.write(entry.to_json() + "\n")
        # Flushed to the OS per answer: a SIGKILL cannot take back what the kernel holds.
        self._journal.flush()
        self._segment_entries += 1
        self._dirty = True
        self.entries.setdefault(entry.key, entry)
        if time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Copy the current journal segment to the store."""
        self._last_sync = time.monotonic()
        if not self._dirty or self._segment is None:
            return
        os.fsync(self._journal.fileno())
        path = self.journal_dir / self._segment
        self.store.put_file(LEDGER_SEGMENTS + self._segment, path)
        self._dirty = False

    def _close_journal(self) -> None:
        if self._journal is None:
            return
        self.sync()
        self._journal.close()
        # Published in full: the journal copy is no longer needed.
        (self.journal_dir / self._segment).unlink(missing_ok=True)
        self._journal = None

    def close(self) -> None:
        self._close_journal()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- compaction
#: A segment nothing has written for this long belongs to no live run (a run re-uploads its open
#: segment at every sync, seconds apart), so it may be merged away.
DEFAULT_COMPACT_MIN_AGE_S = 3600.0


@dataclass(frozen=True)
class CompactionResult:
    """What one compaction did to the ledger's segments."""

    segments_before: int
    merged: int
    deleted: int
    #: Rewritten between being read and being deleted (a run woke up): kept, their entries now in two places.
    kept_changed: tuple[str, ...]
    entries: int
    duplicates_dropped: int
    compacted_key: str | None


def compact_ledger(
    store: ObjectStore, *, min_age_s: float = DEFAULT_COMPACT_MIN_AGE_S, now: float | None = None
) -> CompactionResult:
    """Merge the ledger's settled segments into one, keeping the earliest answer per key.

    Every run writes segments of its own, so a busy ledger grows by many small objects, and each
    open reads them all. Nothing paid for is lost at any point: the merged segment is written
    before any source is deleted (a crash in between leaves duplicates, which reading resolves),
    and a source whose version changed after it was read is kept rather than deleted.
    """
    now = time.time() if now is None else now
    segments = [info for info in store.list(LEDGER_SEGMENTS) if info.key.endswith(".jsonl")]
    settled = [info for info in segments if now - info.modified >= min_age_s]
    if len(settled) < 2:
        return CompactionResult(len(segments), 0, 0, (), 0, 0, None)
    kept: dict[str, LedgerEntry] = {}
    read = sum(_keep_earliest(_read_entries(store.get_bytes(info.key), info.key), kept) for info in settled)
    ordered = sorted(kept.values(), key=lambda entry: (entry.created_at, entry.key))
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%dT%H%M%S")
    compacted_key = f"{LEDGER_SEGMENTS}{stamp}-compacted-{uuid.uuid4().hex[:12]}.jsonl"
    store.put_bytes(compacted_key, "".join(entry.to_json() + "\n" for entry in ordered).encode())
    # Re-listed just before deleting: a source written since it was read holds answers the merge lacks.
    versions = {info.key: info.version for info in store.list(LEDGER_SEGMENTS)}
    changed = tuple(info.key for info in settled if versions.get(info.key, info.version) != info.version)
    for info in settled:
        if info.key not in changed:
            store.delete(info.key)
    return CompactionResult(
        segments_before=len(segments),
        merged=len(settled),
        deleted=len(settled) - len(changed),
        kept_changed=changed,
        entries=len(ordered),
        duplicates_dropped=read - len(ordered),
        compacted_key=compacted_key,
    )


@dataclass(frozen=True)
class ModelSpend:
    """What the ledger holds of one teacher model: answers, tokens and dollars."""

    model: str
    answers: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    unpriced: int


def spend_by_model(entries: Iterable[LedgerEntry]) -> list[ModelSpend]:
    """Totals per model over ledger entries, the most expensive first."""
    totals: dict[str, list[float]] = {}
    for entry in entries:
        row = totals.setdefault(entry.model, [0, 0, 0, 0.0, 0])
        row[0] += 1
        row[1] += entry.prompt_tokens
        row[2] += entry.completion_tokens
        if entry.cost_usd is None:
            row[4] += 1
        else:
            row[3] += entry.cost_usd
    spends = [
        ModelSpend(model, int(a), int(p), int(c), float(cost), int(u)) for model, (a, p, c, cost, u) in totals.items()
    ]
    return sorted(spends, key=lambda spend: (-spend.cost_usd, spend.model))
