"""Curation: turn all labelled traffic into a clean, de-duplicated, de-biased example pool.

Rules run in a fixed order over the rows that survived the rules before them, and each removed
row is kept in a "removed" table with the rule that removed it and why, so the counts per rule
add up: ``rows_in == kept + sum(removed_by_rule)``.

1. ``duplicate_request_id``: the same call logged on two days; the earliest is kept.
2. ``too_short`` / ``too_long``: input length bounds, in characters.
3. ``pattern:<name>``: inputs matching a configured regex.
(PII scrubbing, ``pii.py``, when enabled rewrites every input before rule 1; it removes nothing.)
4. ``exact_duplicate``: the same normalised text (case, punctuation and spacing folded).
5. ``near_duplicate``: word-set Jaccard similarity at or above a threshold with an earlier
   input (verified exactly), its candidates found with MinHash and locality-sensitive hashing
   so that it is not quadratic (``minhash.py``); the earlier input is the one kept.
6. ``user_cap``: at most N examples per user, a seeded random sample of each power user's rows,
   so a few heavy users do not dominate what the student learns.
7. ``label_balance`` (optional): down-sample every label to the rarest label's count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill_pipeline.core import duck
from distill_pipeline.core.normalise import normalised_text_sql, word_set_sql
from distill_pipeline.core.task import CurationConfig
from distill_pipeline.data import minhash, pii

# Inputs with fewer distinct words than this are left to the exact rule: with two or three words,
# one changed word is a different comment.
NEAR_DUPLICATE_MIN_WORDS = 4


@dataclass
class CurationStats:
    rows_in: int = 0
    kept: int = 0
    removed_by_rule: dict[str, int] = field(default_factory=dict)
    pii_scrubbed: dict[str, int] = field(default_factory=dict)
    label_conflicts: int = 0
    label_counts: dict[int, int] = field(default_factory=dict)
    users_capped: int = 0


class Curator:
    """Runs the rules as SQL over a working table, each removal a row of a narrow ``removed`` table.

    The working table is written once and never updated row by row: a removal is an insert of
    ``(arrival, rule, detail)``, the normalised texts are a table of their own, and the rows still
    in play are the working table less the removed arrivals. An update of every row of a wide
    table keeps its old and new values in memory until it commits, which a memory limit cannot
    spill; inserts and joins can.
    """

    def __init__(self, label_paths: list[Path], config: CurationConfig, workdir: Path, *, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.memory_limit = duck.DEFAULT_MEMORY_LIMIT
        self.con = duck.connect(workdir, memory_limit=self.memory_limit)
        self.stats = CurationStats()
        sources = ", ".join(duck.sql_string(str(p)) for p in label_paths)
        self.con.execute(
            f"""
            CREATE TABLE work AS SELECT * FROM read_parquet([{sources}], union_by_name = true);
            -- Arrival order from a sort of the keys alone: a window over the whole rows would
            -- sort every column with them.
            ALTER TABLE work ADD COLUMN arrival BIGINT;
            UPDATE work SET arrival = ranked.arrival
            FROM (
                SELECT rowid AS row_id,
                       row_number() OVER (ORDER BY timestamp, request_id, source_key, source_line) AS arrival
                FROM work
            ) AS ranked
            WHERE work.rowid = ranked.row_id;
            CREATE TABLE removed (arrival BIGINT, rule VARCHAR, detail VARCHAR);
            CREATE VIEW kept AS SELECT * FROM work WHERE arrival NOT IN (SELECT arrival FROM removed);
            """
        )
        self.stats.rows_in = self.con.execute("SELECT count(*) FROM work").fetchone()[0]

    def _removed(self, rule: str) -> int:
        return self.con.execute("SELECT count(*) FROM removed WHERE rule = ?", [rule]).fetchone()[0]

    def _remove(self, rule: str, condition: str, detail: str = "NULL") -> None:
        """Remove the rows still in play that match ``condition``, for ``rule``."""
        self.con.execute(
            f"INSERT INTO removed SELECT arrival, {duck.sql_string(rule)}, {detail} FROM kept WHERE {condition}"
        )
        self.stats.removed_by_rule[rule] = self._removed(rule)

    def run(self) -> CurationStats:
        config = self.config
        # Scrubbing comes first so that no table this stage writes, the removed rows' excerpts
        # included, carries the personal data it was asked to remove.
        if config.scrub_pii:
            self.stats.pii_scrubbed = pii.scrub_table(self.con, "work", {"input": "TRUE"})
        self._remove_duplicate_request_ids()
        self._remove("too_short", f"length(trim(input)) < {int(config.min_chars)}", "length(trim(input))::VARCHAR")
        self._remove("too_long", f"length(input) > {int(config.max_chars)}", "length(input)::VARCHAR")
        for name, pattern in config.drop_patterns.items():
            self._remove(f"pattern:{name}", f"regexp_matches(input, {duck.sql_string(pattern)})")
        self.con.execute(
            f"CREATE TEMP TABLE norms AS SELECT arrival, label, {normalised_text_sql('input')} AS norm FROM kept"
        )
        self._remove_exact_duplicates()
        if config.near_duplicate_threshold is not None:
            self._remove_near_duplicates(float(config.near_duplicate_threshold))
        if config.max_examples_per_user is not None:
            self._cap_users(int(config.max_examples_per_user))
        if config.balance_labels:
            self._balance_labels()
        self.stats.kept = self.con.execute("SELECT count(*) FROM kept").fetchone()[0]
        self.stats.label_counts = dict(
            self.con.execute("SELECT label, count(*) FROM kept GROUP BY 1 ORDER BY 1").fetchall()
        )
        return self.stats

    def _remove_duplicate_request_ids(self) -> None:
        self._remove(
            "duplicate_request_id",
            # Only ids seen more than once are joined back: a few rows, not every row.
            """arrival IN (
                SELECT w.arrival FROM work w
                JOIN (SELECT request_id, min(arrival) AS first FROM work GROUP BY request_id HAVING count(*) > 1) d
                  ON w.request_id = d.request_id
                WHERE w.arrival > d.first
            )""",
            "'kept the earliest copy'",
        )

    def _remove_exact_duplicates(self) -> None:
        self.con.execute(
            """
            CREATE TEMP TABLE exact_groups AS
            -- Two labels or more is a min unlike the max, at a third of count(DISTINCT)'s cost.
            SELECT norm, min(arrival) AS first_arrival, min(label) <> max(label) AS label_conflict
            FROM norms GROUP BY norm HAVING count(*) > 1
            """
        )
        self.stats.label_conflicts = self.con.execute(
            "SELECT count(*) FROM exact_groups WHERE label_conflict"
        ).fetchone()[0]
        self.con.execute(
            """
            INSERT INTO removed
            SELECT n.arrival, 'exact_duplicate', 'same text as arrival #' || g.first_arrival
            FROM norms n JOIN exact_groups g ON n.norm = g.norm
            WHERE n.arrival > g.first_arrival
            """
        )
        self.stats.removed_by_rule["exact_duplicate"] = self._removed("exact_duplicate")

    def _remove_near_duplicates(self, threshold: float) -> None:
        self.con.execute(
            f"""
            CREATE TEMP TABLE words AS
            SELECT arrival, {word_set_sql("norm")} AS words
            FROM norms WHERE arrival NOT IN (SELECT arrival FROM removed);
            DELETE FROM words WHERE len(words) < {NEAR_DUPLICATE_MIN_WORDS};
            """
        )
        texts = self.con.sql("SELECT arrival, words FROM words ORDER BY arrival").to_arrow_table()
        self.con.execute("DROP TABLE words")
        arrivals = texts.column("arrival").to_numpy()
        word_lists = texts.column("words").combine_chunks()
        del texts
        offsets = word_lists.offsets.to_numpy().astype(np.int64)
        # A word's index in the table's own vocabulary names it for the hash functions.
        word_ids = (
            pc.dictionary_encode(word_lists.values.slice(offsets[0], offsets[-1] - offsets[0]))
            .indices.to_numpy()
        )
        del word_lists
        with duck.set_aside(self.con, memory_limit=self.memory_limit):
            similar_to = minhash.near_duplicates(word_ids, offsets - offsets[0], threshold)
        later = np.flatnonzero(similar_to >= 0)
        self.con.register(
            "near_duplicate_pairs",
            pa.table({"later": arrivals[later], "earlier": arrivals[similar_to[later]]}),
        )
        try:
            self.con.execute(
                "INSERT INTO removed SELECT later, 'near_duplicate', 'similar to arrival #' || earlier "
                "FROM near_duplicate_pairs"
            )
        finally:
            self.con.unregister("near_duplicate_pairs")
        self.stats.removed_by_rule["near_duplicate"] = self._removed("near_duplicate")

    def _cap_users(self, cap: int) -> None:
        self.con.execute(
            f"""
            CREATE TEMP TABLE user_rank AS
            SELECT arrival, user_id,
                   row_number() OVER (PARTITION BY user_id ORDER BY {duck.seeded_hash_sql("request_id", self.seed, "user_cap")}) AS rank
            FROM kept
            """
        )
        self.stats.users_capped = self.con.execute(
            f"SELECT count(DISTINCT user_id) FROM user_rank WHERE rank > {cap}"
        ).fetchone()[0]
        self.con.execute(
            f"INSERT INTO removed SELECT arrival, 'user_cap', 'user over {cap} examples' FROM user_rank WHERE rank > {cap}"
        )
        self.stats.removed_by_rule["user_cap"] = self._removed("user_cap")

    def _balance_labels(self) -> None:
        self.con.execute(
            f"""
            CREATE TEMP TABLE label_rank AS
            SELECT arrival,
                   row_number() OVER (PARTITION BY label ORDER BY {duck.seeded_hash_sql("request_id", self.seed, "label_balance")}) AS rank,
                   (SELECT min(n) FROM (SELECT count(*) AS n FROM kept GROUP BY label)) AS rarest
            FROM kept
            """
        )
        self.con.execute(
            "INSERT INTO removed SELECT arrival, 'label_balance', 'label above the rarest label count' "
            "FROM label_rank WHERE rank > rarest"
        )
        self.stats.removed_by_rule["label_balance"] = self._removed("label_balance")

    def write(self, curated_path: Path, removed_path: Path) -> None:
        duck.copy_to_parquet(self.con, "SELECT * EXCLUDE (arrival) FROM kept ORDER BY arrival", curated_path)
        duck.copy_to_parquet(
            self.con,
            "SELECT r.rule, r.detail, w.request_id, w.user_id, w.label, left(w.input, 300) AS input_excerpt "
            "FROM removed r JOIN work w ON w.arrival = r.arrival ORDER BY r.arrival",
            removed_path,
        )

    def close(self) -> None:
        self.con.close()


def curate(
    label_paths: list[Path],
    config: CurationConfig,
    workdir: Path,
    curated_path: Path,
    removed_path: Path,
    *,
    seed: int,
) -> CurationStats:
    """Apply the curation rules to the union of ``label_paths`` (``teacher_labels`` tables)."""
    curator = Curator(label_paths, config, workdir, seed=seed)
    try:
        stats = curator.run()
        curator.write(curated_path, removed_path)
    finally:
        curator.close()
    if stats.kept + sum(stats.removed_by_rule.values()) != stats.rows_in:
        raise AssertionError(f"curation accounting broken: {stats}")
    return stats
