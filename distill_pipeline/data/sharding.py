"""A day's ingestion split into shards that run apart, then merged exactly.

The day's log objects, in key order, are cut into contiguous shards of about equal bytes
(:func:`plan_shards`); each shard is ingested on its own (:func:`ingest_shard`: a step of its
own, on another process or pod), deduplicating request ids within itself. :func:`merge_shards` then makes the
request-id dedup global: a record whose id a shard earlier in key order already kept is moved
to quarantine as a duplicate, and every duplicate names the place its id was first seen in the
whole day. Since shards are contiguous in key order, "first in the earliest shard" is "first in
the day", and the merged tables are the rows a single ingestion of the day writes.

Only the records' request ids and positions cross shards in the merge, so it costs a join of
ids, not a second pass over the lines.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distill_pipeline.core import duck
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.data.ingest import (
    DEFAULT_MAX_LINE_BYTES,
    DEFAULT_MAX_OBJECT_BYTES,
    DUPLICATE_REASON,
    QUARANTINE_COLUMNS,
    RECORD_COLUMNS,
    IngestStats,
    ingest_objects,
)


@dataclass(frozen=True)
class ShardOutput:
    """What one shard wrote: its records and quarantine tables, and its counts."""

    records: Path
    quarantine: Path
    stats: IngestStats


def plan_shards(objects: Sequence[tuple[str, int]], shards: int) -> list[list[str]]:
    """The keys of ``objects`` (key, bytes) cut into at most ``shards`` contiguous runs in key
    order, each about an equal share of the bytes; no shard is empty."""
    if shards < 1:
        raise ValueError(f"the number of shards must be at least 1, not {shards}")
    ordered = sorted(objects)
    if not ordered:
        return []
    total = sum(max(size, 1) for _, size in ordered)
    planned: list[list[str]] = [[] for _ in range(min(shards, len(ordered)))]
    seen = 0
    for key, size in ordered:
        index = min(len(planned) - 1, seen * len(planned) // total)
        planned[index].append(key)
        seen += max(size, 1)
    return [keys for keys in planned if keys]


def ingest_shard(
    store: ObjectStore,
    keys: Sequence[str],
    workdir: Path,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    scrub_pii: bool = False,
) -> ShardOutput:
    """Ingest one shard's objects into ``workdir`` (request ids deduplicated within the shard)."""
    records, quarantine = workdir / "records.parquet", workdir / "quarantine.parquet"
    stats = ingest_objects(
        store,
        keys,
        workdir / "duckdb",
        records,
        quarantine,
        max_line_bytes=max_line_bytes,
        max_object_bytes=max_object_bytes,
        scrub_pii=scrub_pii,
    )
    return ShardOutput(records, quarantine, stats)


def merge_shards(
    outputs: Sequence[ShardOutput], workdir: Path, records_path: Path, quarantine_path: Path
) -> IngestStats:
    """One day's records and quarantine from its shards, with request ids unique across them."""
    if len(outputs) == 1:
        # One shard's tables are the day's: its own ingestion already made its ids unique.
        only = outputs[0]
        shutil.copyfile(only.records, records_path)
        shutil.copyfile(only.quarantine, quarantine_path)
        return dataclasses.replace(
            only.stats, reasons=dict(only.stats.reasons), pii_scrubbed=dict(only.stats.pii_scrubbed)
        )
    con = duck.connect(workdir)
    try:
        records = ", ".join(duck.sql_string(str(o.records)) for o in outputs)
        quarantines = ", ".join(duck.sql_string(str(o.quarantine)) for o in outputs)
        columns = ", ".join(RECORD_COLUMNS)
        con.execute(
            f"""
            CREATE TABLE records AS SELECT {columns} FROM read_parquet([{records}]);
            CREATE TABLE quarantined AS SELECT {", ".join(QUARANTINE_COLUMNS)} FROM read_parquet([{quarantines}]);
            -- Where each id kept by more than one shard was first seen in the day.
            CREATE TABLE first_seen AS
            SELECT request_id, arg_min(source_key || ':' || source_line, (source_key, source_line)) AS first_seen,
                   min((source_key, source_line)) AS first_place
            FROM records GROUP BY request_id HAVING count(*) > 1;
            """
        )
        kept = (
            "(r.request_id NOT IN (SELECT request_id FROM first_seen) OR (r.source_key, r.source_line) = f.first_place)"
        )
        duck.copy_to_parquet(
            con,
            f"SELECT r.* FROM records r LEFT JOIN first_seen f USING (request_id) WHERE {kept} "
            "ORDER BY r.source_key, r.source_line",
            records_path,
        )
        duck.copy_to_parquet(
            con,
            f"""
            SELECT * FROM (
                SELECT q.source_key, q.source_line, q.reason, q.request_id, q.line_bytes,
                       CASE WHEN q.reason = '{DUPLICATE_REASON}' AND f.first_seen IS NOT NULL
                            THEN 'first seen at ' || f.first_seen ELSE q.excerpt END AS excerpt
                FROM quarantined q LEFT JOIN first_seen f ON q.reason = '{DUPLICATE_REASON}' AND q.request_id = f.request_id
                UNION ALL
                SELECT r.source_key, r.source_line, '{DUPLICATE_REASON}', r.request_id, strlen(r.input),
                       'first seen at ' || f.first_seen
                FROM records r JOIN first_seen f USING (request_id) WHERE NOT {kept}
            ) ORDER BY source_key, source_line
            """,
            quarantine_path,
        )
        stats = IngestStats(
            objects=sum(o.stats.objects for o in outputs),
            bytes_in=sum(o.stats.bytes_in for o in outputs),
            lines_in=sum(o.stats.lines_in for o in outputs),
        )
        for output in outputs:
            for kind, count in output.stats.pii_scrubbed.items():
                stats.pii_scrubbed[kind] = stats.pii_scrubbed.get(kind, 0) + count
        stats.kept = con.execute(f"SELECT count(*) FROM read_parquet({duck.sql_string(str(records_path))})").fetchone()[
            0
        ]
        stats.reasons = dict(
            con.execute(
                f"SELECT reason, count(*) FROM read_parquet({duck.sql_string(str(quarantine_path))}) "
                "GROUP BY reason ORDER BY 2 DESC, 1"
            ).fetchall()
        )
        stats.quarantined = sum(stats.reasons.values())
        if stats.kept + stats.quarantined != stats.lines_in:
            raise AssertionError(
                f"shard merge accounting broken: {stats.lines_in} lines in, {stats.kept} kept, "
                f"{stats.quarantined} quarantined"
            )
        return stats
    finally:
        con.close()
