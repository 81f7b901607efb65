"""Frozen test sets and nested, size-partitioned training sets.

Test sets are drawn once from the curated pool: an in-distribution set (a seeded random sample,
so its label mix is the traffic's) and a balanced set (equal rows per label) drawn from what is
left. The caller freezes them; later runs reuse them so that numbers stay comparable.

Training sets are drawn from the curated pool minus every test row, matched by request id and
by normalised text. Rows are ranked once by a seeded hash of their request id and each size
takes a prefix of that ranking, so every smaller set is a subset of every larger one and an
ablation over sizes changes nothing but the size. The two draws hash with different salts: had
the training ranking reused the test draw, the rows just past the balanced set's cut would be
short of the rarer label. DuckDB combines ``hash(a, b, c)`` by XOR, so a salt alone only flips
fixed bits of the test draw (the rankings stay correlated); the outer ``hash`` remixes it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from distill_pipeline.core import duck
from distill_pipeline.core.normalise import normalised_text_sql

#: The frozen test sets, by the name every table, report and metric uses, with how prose names them.
TEST_SETS: dict[str, str] = {"in_distribution": "in-distribution set", "balanced": "balanced set"}

_SIZE_SPEC = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*%|(\d+))\s*$")


@dataclass(frozen=True)
class TrainSize:
    """A training-set size: a share of the pool (``"25%"``) or an absolute row count (``"1000"``)."""

    fraction: float | None = None
    rows: int | None = None

    @classmethod
    def parse(cls, spec: str) -> TrainSize:
        match = _SIZE_SPEC.match(spec)
        if not match:
            raise ValueError(f"training-set size {spec!r} is neither a percentage like '25%' nor a row count")
        if match.group(1) is not None:
            percent = float(match.group(1))
            if not 0 < percent <= 100:
                raise ValueError(f"training-set share {spec!r} must be in (0%, 100%]")
            return cls(fraction=percent / 100)
        rows = int(match.group(2))
        if rows <= 0:
            raise ValueError(f"training-set size {spec!r} must be positive")
        return cls(rows=rows)

    @classmethod
    def from_key(cls, key: str) -> TrainSize:
        """The size a partition key names (the inverse of :attr:`key`)."""
        if key.endswith("pct"):
            return cls.parse(key[: -len("pct")].replace("_", ".") + "%")
        if key.startswith("n"):
            return cls.parse(key[1:])
        raise ValueError(f"{key!r} is not a training-set size key like '25pct' or 'n1000'")

    @property
    def key(self) -> str:
        """The partition key: ``25pct`` or ``n1000``."""
        if self.fraction is not None:
            percent = self.fraction * 100
            return f"{percent:g}pct".replace(".", "_")
        return f"n{self.rows}"

    def rows_from(self, pool_rows: int) -> int:
        if self.fraction is not None:
            return min(pool_rows, math.ceil(self.fraction * pool_rows))
        return min(pool_rows, int(self.rows or 0))


@dataclass
class TestSetStats:
    in_distribution_rows: int = 0
    balanced_rows: int = 0
    in_distribution_labels: dict[int, int] = field(default_factory=dict)
    balanced_labels: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class TrainSetStats:
    pool_rows: int = 0
    excluded_by_id: int = 0
    excluded_by_text: int = 0
    rows: int = 0
    requested: str = ""
    label_counts: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _label_counts(con, table: str) -> dict[int, int]:
    return dict(con.execute(f"SELECT label, count(*) FROM {table} GROUP BY 1 ORDER BY 1").fetchall())


def build_test_sets(
    curated_path: Path,
    label_values: tuple[int, ...],
    *,
    in_distribution_size: int,
    balanced_size: int,
    seed: int,
    workdir: Path,
    in_distribution_path: Path,
    balanced_path: Path,
) -> TestSetStats:
    """Draw both test sets from the curated pool; they share no row and no normalised text."""
    con = duck.connect(workdir)
    stats = TestSetStats()
    try:
        con.execute(
            f"""
            CREATE TABLE pool AS
            SELECT *, {normalised_text_sql("input")} AS norm, {duck.seeded_hash_sql("request_id", seed, "test")} AS draw
            FROM read_parquet({duck.sql_string(str(curated_path))})
            """
        )
        con.execute(
            f"CREATE TABLE in_distribution AS SELECT * FROM pool ORDER BY draw LIMIT {int(in_distribution_size)}"
        )
        per_label = balanced_size // len(label_values)
        con.execute(
            f"""
            CREATE TABLE balanced AS
            SELECT * EXCLUDE (rank) FROM (
                SELECT *, row_number() OVER (PARTITION BY label ORDER BY draw) AS rank FROM pool
                WHERE request_id NOT IN (SELECT request_id FROM in_distribution)
                  AND norm NOT IN (SELECT norm FROM in_distribution)
            ) WHERE rank <= {per_label}
            """
        )
        stats.in_distribution_labels = _label_counts(con, "in_distribution")
        stats.balanced_labels = _label_counts(con, "balanced")
        stats.in_distribution_rows = sum(stats.in_distribution_labels.values())
        stats.balanced_rows = sum(stats.balanced_labels.values())
        if stats.in_distribution_rows < in_distribution_size:
            stats.warnings.append(
                f"in-distribution test set has {stats.in_distribution_rows} rows, fewer than the {in_distribution_size} asked"
            )
        for value in label_values:
            if stats.balanced_labels.get(value, 0) < per_label:
                stats.warnings.append(
                    f"balanced test set has {stats.balanced_labels.get(value, 0)} rows of label {value}, "
                    f"fewer than the {per_label} asked: not balanced"
                )
        for table, path in (("in_distribution", in_distribution_path), ("balanced", balanced_path)):
            duck.copy_to_parquet(con, f"SELECT * EXCLUDE (norm, draw) FROM {table} ORDER BY draw", path)
        return stats
    finally:
        con.close()


def build_train_set(
    curated_path: Path,
    test_paths: list[Path],
    size: TrainSize,
    *,
    seed: int,
    workdir: Path,
    train_path: Path,
) -> TrainSetStats:
    """The first rows of the seeded ranking of the pool (curated minus test rows)."""
    con = duck.connect(workdir)
    stats = TrainSetStats(requested=size.key)
    try:
        tests = ", ".join(duck.sql_string(str(p)) for p in test_paths)
        con.execute(
            f"""
            CREATE TABLE test_rows AS
            SELECT request_id, {normalised_text_sql("input")} AS norm FROM read_parquet([{tests}], union_by_name = true);
            CREATE TABLE curated AS
            SELECT *, {normalised_text_sql("input")} AS norm FROM read_parquet({duck.sql_string(str(curated_path))});
            """
        )
        stats.excluded_by_id = con.execute(
            "SELECT count(*) FROM curated WHERE request_id IN (SELECT request_id FROM test_rows)"
        ).fetchone()[0]
        stats.excluded_by_text = con.execute(
            "SELECT count(*) FROM curated WHERE request_id NOT IN (SELECT request_id FROM test_rows) "
            "AND norm IN (SELECT norm FROM test_rows)"
        ).fetchone()[0]
        # A view: it is counted, then ranked once for the training rows.
        con.execute(
            """
            CREATE VIEW pool AS
            SELECT * FROM curated
            WHERE request_id NOT IN (SELECT request_id FROM test_rows) AND norm NOT IN (SELECT norm FROM test_rows)
            """
        )
        stats.pool_rows = con.execute("SELECT count(*) FROM pool").fetchone()[0]
        wanted = size.rows_from(stats.pool_rows)
        if size.rows is not None and size.rows > stats.pool_rows:
            stats.warnings.append(f"asked for {size.rows} rows but the pool has only {stats.pool_rows}")
        con.execute(
            f"CREATE TABLE train AS SELECT * EXCLUDE (norm) FROM pool ORDER BY {duck.seeded_hash_sql('request_id', seed, 'train')}, request_id "
            f"LIMIT {wanted}"
        )
        stats.label_counts = _label_counts(con, "train")
        stats.rows = sum(stats.label_counts.values())
        duck.copy_to_parquet(con, "SELECT * FROM train", train_path)
        return stats
    finally:
        con.close()


@dataclass
class Leakage:
    by_id: int
    by_text: int

    @property
    def total(self) -> int:
        return self.by_id + self.by_text


def find_leakage(train_path: Path, test_paths: list[Path]) -> Leakage:
    """How many training rows share a request id, or a normalised text, with a test row."""
    con = duck.connect()
    try:
        tests = ", ".join(duck.sql_string(str(p)) for p in test_paths)
        norm = normalised_text_sql("input")
        by_id, by_text = con.execute(
            f"""
            WITH test_rows AS (SELECT request_id, {norm} AS norm FROM read_parquet([{tests}], union_by_name = true)),
                 train AS (SELECT request_id, {norm} AS norm FROM read_parquet({duck.sql_string(str(train_path))}))
            SELECT count(*) FILTER (WHERE request_id IN (SELECT request_id FROM test_rows)),
                   count(*) FILTER (WHERE norm IN (SELECT norm FROM test_rows))
            FROM train
            """
        ).fetchone()
        return Leakage(by_id=by_id, by_text=by_text)
    finally:
        con.close()
