"""Frozen test sets and nested training sets: sizes, balance, determinism, and no leakage."""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.data.splitting import TrainSize, build_test_sets, build_train_set, find_leakage

T0 = dt.datetime(2026, 3, 4, 8, 0, tzinfo=dt.UTC)
SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("day", pa.date32()),
        ("user_id", pa.string()),
        ("input", pa.string()),
        ("label", pa.int64()),
    ]
)


def norm(text: str) -> str:
    """The pipeline's normalisation, in Python: lower case, letters and digits, single spaces."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def rows_of(n: int, positive_every: int = 5, prefix: str = "r", start: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(start, start + n):
        out.append(
            {
                "request_id": f"{prefix}-{i:05d}",
                "timestamp": T0 + dt.timedelta(seconds=i),
                "day": T0.date(),
                "user_id": f"user-{i % 50}",
                "input": f"Comment number {i} about topic {i * 7 % 101}",
                "label": 1 if i % positive_every == 0 else 0,
            }
        )
    return out


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def read(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def make_tests(tmp_path: Path, curated: Path, *, in_size: int, balanced_size: int, seed: int = 1, name: str = "t"):
    out = tmp_path / name
    stats = build_test_sets(
        curated,
        (0, 1),
        in_distribution_size=in_size,
        balanced_size=balanced_size,
        seed=seed,
        workdir=out / "work",
        in_distribution_path=out / "in_distribution.parquet",
        balanced_path=out / "balanced.parquet",
    )
    return stats, out / "in_distribution.parquet", out / "balanced.parquet"


def make_train(tmp_path: Path, curated: Path, tests: list[Path], spec: str, *, seed: int = 1, name: str = "tr"):
    size = TrainSize.parse(spec)
    out = tmp_path / f"{name}-{size.key}"
    stats = build_train_set(curated, tests, size, seed=seed, workdir=out / "work", train_path=out / "train.parquet")
    return stats, out / "train.parquet"


# --- test sets ---------------------------------------------------------------------------------


def test_test_sets_sizes_balance_and_disjointness(tmp_path):
    rows = rows_of(1000)
    # Twin texts under other ids (case and punctuation apart): a pool that curation did not
    # de-duplicate must still not put one twin in each test set.
    rows += [{**r, "request_id": f"twin-{i}", "input": r["input"].upper() + "!!"} for i, r in enumerate(rows[:300])]
    curated = write(tmp_path / "curated.parquet", rows)
    stats, in_dist, balanced = make_tests(tmp_path, curated, in_size=200, balanced_size=100)

    in_rows, bal_rows = read(in_dist), read(balanced)
    assert len(in_rows) == stats.in_distribution_rows == 200
    assert len(bal_rows) == stats.balanced_rows == 100
    assert Counter(r["label"] for r in bal_rows) == {0: 50, 1: 50}
    assert stats.balanced_labels == {0: 50, 1: 50}
    assert stats.warnings == []
    # The in-distribution set is a random sample: its label mix is the pool's (20% positive).
    positives = sum(r["label"] for r in in_rows)
    assert stats.in_distribution_labels == {0: 200 - positives, 1: positives}
    assert 20 <= positives <= 60
    # Not just the first rows of the table.
    assert max(r["request_id"] for r in in_rows if r["request_id"].startswith("r-")) > "r-00500"

    assert not {r["request_id"] for r in in_rows} & {r["request_id"] for r in bal_rows}
    assert not {norm(r["input"]) for r in in_rows} & {norm(r["input"]) for r in bal_rows}
    # The test sets have the curated table's columns.
    assert pq.read_schema(in_dist).names == pq.read_schema(balanced).names == SCHEMA.names


def test_test_sets_are_deterministic_for_a_seed(tmp_path):
    curated = write(tmp_path / "curated.parquet", rows_of(500))
    _, a_in, a_bal = make_tests(tmp_path, curated, in_size=50, balanced_size=40, seed=3, name="a")
    _, b_in, b_bal = make_tests(tmp_path, curated, in_size=50, balanced_size=40, seed=3, name="b")
    _, c_in, _ = make_tests(tmp_path, curated, in_size=50, balanced_size=40, seed=4, name="c")
    assert read(a_in) == read(b_in)
    assert read(a_bal) == read(b_bal)
    assert {r["request_id"] for r in read(c_in)} != {r["request_id"] for r in read(a_in)}


def test_test_sets_warn_when_the_pool_is_short(tmp_path):
    # 100 rows, only 5 positive.
    curated = write(tmp_path / "curated.parquet", rows_of(100, positive_every=20))
    stats, _, balanced = make_tests(tmp_path, curated, in_size=20, balanced_size=20)
    assert stats.in_distribution_rows == 20
    # Whatever positives the in-distribution set left, there are fewer than the 10 asked.
    assert stats.balanced_labels[0] == 10
    assert stats.balanced_labels.get(1, 0) == 5 - stats.in_distribution_labels.get(1, 0)
    assert len(read(balanced)) == stats.balanced_rows < 20
    assert [w for w in stats.warnings if "not balanced" in w] == [
        f"balanced test set has {stats.balanced_labels.get(1, 0)} rows of label 1, fewer than the 10 asked: not balanced"
    ]

    stats, _, _ = make_tests(tmp_path, curated, in_size=500, balanced_size=20, name="big")
    assert stats.in_distribution_rows == 100
    assert stats.balanced_rows == 0
    assert any("fewer than the 500 asked" in w for w in stats.warnings)


# --- training sets -----------------------------------------------------------------------------


@pytest.fixture
def frozen(tmp_path):
    """A curated pool of 2000 rows and its two frozen test sets."""
    curated = write(tmp_path / "curated.parquet", rows_of(2000))
    _, in_dist, balanced = make_tests(tmp_path, curated, in_size=150, balanced_size=100)
    return curated, [in_dist, balanced]


def test_training_sets_are_nested_and_sized(tmp_path, frozen):
    curated, tests = frozen
    pool_rows = 2000 - 150 - 100
    previous: set[str] = set()
    for spec in ["5%", "10%", "25%", "50%", "75%", "100%"]:
        stats, path = make_train(tmp_path, curated, tests, spec)
        ids = {r["request_id"] for r in read(path)}
        assert stats.pool_rows == pool_rows
        assert stats.excluded_by_id == 250
        assert stats.rows == len(ids) == math.ceil(TrainSize.parse(spec).fraction * pool_rows)
        assert previous < ids, spec
        previous = ids
    assert len(previous) == pool_rows

    stats, path = make_train(tmp_path, curated, tests, "300")
    assert stats.rows == len(read(path)) == 300
    assert stats.warnings == []
    # An absolute size is a prefix of the same ranking.
    assert {r["request_id"] for r in read(path)} < previous

    stats, path = make_train(tmp_path, curated, tests, "100000")
    assert stats.rows == pool_rows
    assert any("only 1750" in w for w in stats.warnings)
    assert pq.read_schema(path).names == SCHEMA.names


def test_training_sets_are_deterministic_for_a_seed(tmp_path, frozen):
    curated, tests = frozen
    _, a = make_train(tmp_path, curated, tests, "10%", seed=5, name="a")
    _, b = make_train(tmp_path, curated, tests, "10%", seed=5, name="b")
    _, c = make_train(tmp_path, curated, tests, "10%", seed=6, name="c")
    assert read(a) == read(b)
    assert {r["request_id"] for r in read(a)} != {r["request_id"] for r in read(c)}


def test_no_leakage_even_from_data_added_after_the_test_sets_were_frozen(tmp_path, frozen):
    curated, tests = frozen
    test_rows = read(tests[0]) + read(tests[1])
    # New traffic: some of it repeats test comments (re-cased, re-punctuated) under new ids.
    copies = [
        {**r, "request_id": f"later-{i}", "input": f"  {r['input'].upper()} ?!", "timestamp": T0 + dt.timedelta(days=1)}
        for i, r in enumerate(test_rows[:40])
    ]
    fresh = rows_of(100, prefix="fresh", start=5000)
    grown = write(tmp_path / "curated-grown.parquet", read(curated) + copies + fresh)

    stats, path = make_train(tmp_path, grown, tests, "100%")
    train = read(path)
    assert stats.excluded_by_id == len(test_rows)
    assert stats.excluded_by_text == len(copies)
    assert stats.pool_rows == 2000 + 100 - len(test_rows)
    assert not {r["request_id"] for r in train} & {r["request_id"] for r in test_rows}
    assert not {norm(r["input"]) for r in train} & {norm(r["input"]) for r in test_rows}
    leak = find_leakage(path, tests)
    assert (leak.by_id, leak.by_text, leak.total) == (0, 0, 0)
    # The fresh rows are in, the copies are out.
    ids = {r["request_id"] for r in train}
    assert {r["request_id"] for r in fresh} <= ids
    assert not any(i.startswith("later-") for i in ids)


@pytest.mark.parametrize("seed", [1, 17])
def test_small_training_sets_keep_the_label_mix(tmp_path, seed):
    # Regression: when the training ranking was (or, through DuckDB's XOR-combined multi-argument
    # hash, was correlated with) the test draw, the balanced test set took the first positives of
    # that ranking, and the small training sets (its prefixes) got almost none.
    curated = write(tmp_path / "curated.parquet", rows_of(5000, positive_every=10))
    _, in_dist, balanced = make_tests(tmp_path, curated, in_size=200, balanced_size=400, seed=seed)
    tests = [in_dist, balanced]

    _, full = make_train(tmp_path, curated, tests, "100%", seed=seed)
    full_rows = read(full)
    pool_rate = sum(r["label"] for r in full_rows) / len(full_rows)
    assert 0.04 < pool_rate < 0.09  # 500 positives, about 220 of them taken by the test sets
    for spec in ("5%", "10%", "25%"):
        stats, _ = make_train(tmp_path, curated, tests, spec, seed=seed)
        rate = stats.label_counts.get(1, 0) / stats.rows
        assert pool_rate * 0.5 < rate < pool_rate * 1.5, (spec, rate, pool_rate)


# --- sizes and leakage counts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "key", "fraction", "rows"),
    [
        ("5%", "5pct", 0.05, None),
        ("100%", "100pct", 1.0, None),
        (" 25 % ", "25pct", 0.25, None),
        ("2.5%", "2_5pct", 0.025, None),
        ("1000", "n1000", None, 1000),
        ("1", "n1", None, 1),
    ],
)
def test_train_size_parse_and_key(spec, key, fraction, rows):
    size = TrainSize.parse(spec)
    assert size.key == key
    assert size.rows == rows
    if fraction is None:
        assert size.fraction is None
    else:
        assert size.fraction == pytest.approx(fraction)


@pytest.mark.parametrize("spec", ["", "abc", "0", "0%", "-5", "-5%", "101%", "5%%", "1e3", "5.5", "%", "10 rows"])
def test_train_size_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        TrainSize.parse(spec)


def test_train_size_rows_from_pool():
    assert TrainSize.parse("5%").rows_from(101) == 6  # rounded up: never an empty small set
    assert TrainSize.parse("100%").rows_from(101) == 101
    assert TrainSize.parse("50").rows_from(20) == 20
    assert TrainSize.parse("50").rows_from(80) == 50


def test_find_leakage_counts(tmp_path):
    def one(request_id: str, text: str) -> dict[str, Any]:
        return {"request_id": request_id, "timestamp": T0, "day": T0.date(), "user_id": "u", "input": text, "label": 0}

    test_a = write(tmp_path / "a.parquet", [one("t1", "Hello world"), one("t2", "Another one")])
    test_b = write(tmp_path / "b.parquet", [one("t3", "Third test row")])
    train = write(
        tmp_path / "train.parquet",
        [
            one("t1", "a different text under a test id"),  # by id
            one("x1", "HELLO,   world!!"),  # by text
            one("t2", "another one"),  # by both
            one("x2", "third TEST row."),  # by text, from the second test set
            one("x3", "clean row"),
        ],
    )
    leak = find_leakage(train, [test_a, test_b])
    assert (leak.by_id, leak.by_text, leak.total) == (2, 3, 5)
    clean = write(tmp_path / "clean.parquet", [one("x3", "clean row")])
    assert find_leakage(clean, [test_a, test_b]).total == 0
