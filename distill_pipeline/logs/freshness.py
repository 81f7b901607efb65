"""Which days have new or rewritten log objects since the last look: the fresh-logs sensor's logic.

The state is one fingerprint per day: a hash of the day's log objects and their versions (S3
ETag, or a local file's mtime and size). A day whose fingerprint changed needs its partitions
re-materialised, and the new fingerprint names that work: the same objects always give the same
run key, so a tick that is replayed, or a sensor restarted from an old state, asks for nothing
that was already asked for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from distill_pipeline.core.store import ObjectInfo
from distill_pipeline.logs.schema import LOG_PREFIX, LOG_SUFFIXES

_DAY_KEY = re.compile(r"^" + re.escape(LOG_PREFIX) + r"/dt=(\d{4}-\d{2}-\d{2})/[^/]+$")
CURSOR_VERSION = 1


@dataclass(frozen=True)
class FreshDay:
    """A day whose log objects changed: the partition to refresh and the key naming this refresh."""

    day: str
    fingerprint: str
    objects: int
    new_objects: int
    keys: frozenset[str]
    # The cursor had no entry for the day: a first look (a new sensor, or a lost cursor).
    first_seen: bool

    @property
    def run_key(self) -> str:
        return f"logs-{self.day}-{self.fingerprint}"


@dataclass(frozen=True)
class FreshnessScan:
    fresh: list[FreshDay]
    skipped_days: list[str]
    cursor: str


def log_day(key: str) -> str | None:
    """The day of a log object key (``logs/dt=YYYY-MM-DD/name.jsonl``), or None for other keys."""
    match = _DAY_KEY.match(key)
    return match.group(1) if match and key.endswith(LOG_SUFFIXES) else None


def day_fingerprints(listing: Iterable[ObjectInfo]) -> dict[str, tuple[str, frozenset[str]]]:
    """Per day: a fingerprint of its log objects (keys and versions) and the set of keys."""
    by_day: dict[str, list[tuple[str, str]]] = {}
    for info in listing:
        day = log_day(info.key)
        if day is not None:
            by_day.setdefault(day, []).append((info.key, info.version))
    fingerprints = {}
    for day, objects in by_day.items():
        digest = hashlib.sha256(json.dumps(sorted(objects)).encode()).hexdigest()[:16]
        fingerprints[day] = (digest, frozenset(key for key, _ in objects))
    return fingerprints


def parse_cursor(cursor: str | None) -> dict[str, dict[str, object]]:
    """The per-day state of a cursor; an unreadable or foreign cursor counts as a first look."""
    if not cursor:
        return {}
    try:
        state = json.loads(cursor)
    except json.JSONDecodeError:
        return {}
    if not isinstance(state, dict) or state.get("version") != CURSOR_VERSION or not isinstance(state.get("days"), dict):
        return {}
    return state["days"]


def scan_for_fresh_days(
    listing: Iterable[ObjectInfo], cursor: str | None, *, first_day: str, last_day: str
) -> FreshnessScan:
    """Compare the store's log objects with the cursor's fingerprints.

    Days outside ``[first_day, last_day]`` (the partitions that exist) are skipped and stay out
    of the cursor, so they are picked up once their partition exists.
    """
    seen = parse_cursor(cursor)
    current = day_fingerprints(listing)
    fresh, skipped = [], []
    days: dict[str, dict[str, object]] = {}
    for day in sorted(current):
        fingerprint, keys = current[day]
        if not first_day <= day <= last_day:
            skipped.append(day)
            continue
        days[day] = {"fingerprint": fingerprint, "objects": len(keys)}
        previous = seen.get(day)
        if previous is None or previous.get("fingerprint") != fingerprint:
            known = int(previous.get("objects", 0)) if isinstance(previous, dict) else 0  # type: ignore[arg-type]
            fresh.append(FreshDay(day, fingerprint, len(keys), max(len(keys) - known, 0), keys, previous is None))
    # Days whose objects all disappeared are forgotten: a later upload makes them fresh again.
    cursor_out = json.dumps({"version": CURSOR_VERSION, "days": days}, sort_keys=True, separators=(",", ":"))
    return FreshnessScan(fresh, skipped, cursor_out)


def recent_days(count: int, *, until: str | None = None, first_day: str | None = None) -> list[str]:
    """The ``count`` days up to ``until`` (default: today, UTC), oldest first, none before ``first_day``."""
    last = dt.date.fromisoformat(until) if until else dt.datetime.now(dt.UTC).date()
    days = [(last - dt.timedelta(days=back)).isoformat() for back in range(count - 1, -1, -1)]
    return [day for day in days if first_day is None or day >= first_day] or [last.isoformat()]
