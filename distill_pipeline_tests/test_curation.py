"""Curation rules, one at a time on tiny hand-made teacher_labels tables, then all together."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.normalise import jaccard
from distill_pipeline.core.task import CurationConfig
from distill_pipeline.data import minhash
from distill_pipeline.data.curation import CurationStats, curate

T0 = dt.datetime(2026, 3, 4, 8, 0, tzinfo=dt.UTC)

LABEL_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("day", pa.date32()),
        ("user_id", pa.string()),
        ("tenant_id", pa.string()),
        ("model", pa.string()),
        ("prompt_template_id", pa.string()),
        ("prompt_template_version", pa.string()),
        ("input", pa.string()),
        ("label", pa.int64()),
        ("parse_method", pa.string()),
        ("source_key", pa.string()),
        ("source_line", pa.int64()),
    ]
)

# Everything off: each test turns on the rule it is about.
OFF = CurationConfig(min_chars=1, max_chars=100_000, near_duplicate_threshold=None)


def row(request_id: str, text: str, *, minute: int = 0, user: str = "u", label: int = 0) -> dict[str, Any]:
    timestamp = T0 + dt.timedelta(minutes=minute)
    return {
        "request_id": request_id,
        "timestamp": timestamp,
        "day": timestamp.date(),
        "user_id": user,
        "tenant_id": "forum-web",
        "model": "openai/gpt-4",
        "prompt_template_id": "simple_prompt",
        "prompt_template_version": "1",
        "input": text,
        "label": label,
        "parse_method": "json",
        "source_key": f"logs/dt={timestamp.date()}/a.jsonl",
        "source_line": minute + 1,
    }


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABEL_SCHEMA), path)
    return path


class Result:
    def __init__(self, stats: CurationStats, kept: list[dict[str, Any]], removed: list[dict[str, Any]]) -> None:
        self.stats, self.kept, self.removed = stats, kept, removed

    @property
    def kept_ids(self) -> list[str]:
        return [r["request_id"] for r in self.kept]

    def removed_by(self, rule: str) -> list[str]:
        return [r["request_id"] for r in self.removed if r["rule"] == rule]


def run(
    tmp_path: Path, rows_or_paths: list, config: CurationConfig = OFF, *, seed: int = 1, name: str = "run"
) -> Result:
    out = tmp_path / name
    if rows_or_paths and isinstance(rows_or_paths[0], Path):
        paths = rows_or_paths
    else:
        paths = [write(out / "labels.parquet", rows_or_paths)]
    stats = curate(paths, config, out / "work", out / "curated.parquet", out / "removed.parquet", seed=seed)
    # The curated table has the teacher_labels columns and nothing else (no working columns).
    assert pq.read_schema(out / "curated.parquet").names == LABEL_SCHEMA.names
    kept = pq.read_table(out / "curated.parquet").to_pylist()
    removed = pq.read_table(out / "removed.parquet").to_pylist()
    rows_in = sum(pq.read_metadata(p).num_rows for p in paths)
    # The accounting every run must satisfy, whatever the rules.
    assert stats.rows_in == rows_in == stats.kept + sum(stats.removed_by_rule.values())
    assert stats.kept == len(kept)
    assert Counter(r["rule"] for r in removed) == Counter({k: v for k, v in stats.removed_by_rule.items() if v})
    assert all(r["rule"] and r["request_id"] for r in removed)
    assert sum(stats.label_counts.values()) == stats.kept
    return Result(stats, kept, removed)


def test_length_bounds(tmp_path):
    rows = [
        row("short", "abcd"),
        row("padded-short", "   abcd   "),
        row("min", "abcde", minute=1),
        row("max", "x" * 20, minute=2),
        row("long", "y" * 21, minute=3),
    ]
    result = run(tmp_path, rows, CurationConfig(min_chars=5, max_chars=20, near_duplicate_threshold=None))
    assert result.kept_ids == ["min", "max"]
    assert sorted(result.removed_by("too_short")) == ["padded-short", "short"]
    assert result.removed_by("too_long") == ["long"]
    details = {r["request_id"]: r["detail"] for r in result.removed}
    assert details == {"short": "4", "padded-short": "4", "long": "21"}


def test_drop_patterns(tmp_path):
    config = CurationConfig(
        min_chars=1,
        near_duplicate_threshold=None,
        drop_patterns={"url_only": r"^\s*https?://\S+\s*$", "ad": r"(?i)buy now"},
    )
    rows = [
        row("url", "https://bit.ly/3xYzAbc", minute=0),
        row("url-padded", "  http://free-prizes.example/claim ", minute=1),
        row("url-in-text", "see https://example.org/a for the source", minute=2),
        row("ad", "BUY NOW while stocks last", minute=3),
        row("fine", "an ordinary comment", minute=4),
    ]
    result = run(tmp_path, rows, config)
    assert result.kept_ids == ["url-in-text", "fine"]
    assert result.removed_by("pattern:url_only") == ["url", "url-padded"]
    assert result.removed_by("pattern:ad") == ["ad"]
    assert result.stats.removed_by_rule["pattern:ad"] == 1


def test_exact_duplicates_after_normalisation_keep_the_earliest(tmp_path):
    # The file's order is not the arrival order: the earliest timestamp wins.
    rows = [
        row("late", "hello   WORLD...", minute=9, label=1),
        row("middle", "Hello-world", minute=5),
        row("earliest", "Hello, world!", minute=1),
        row("other", "hello there world", minute=2),
        row("accent", "Héllo world", minute=3),
    ]
    result = run(tmp_path, rows)
    assert result.kept_ids == ["earliest", "other", "accent"]
    assert sorted(result.removed_by("exact_duplicate")) == ["late", "middle"]
    # Two labels for one text: a conflict worth counting.
    assert result.stats.label_conflicts == 1
    assert {r["detail"] for r in result.removed} == {"same text as arrival #1"}


TWELVE = "the new patch made ranked mode so much better than last season"
ONE_WORD_CHANGED = "the new patch made ranked mode so much worse than last season"  # Jaccard 11/13
OVERLAPPING = "the new coach made our defense so much better than last season"  # Jaccard 9/15


def test_near_duplicates(tmp_path):
    assert len(set(TWELVE.split())) == len(set(ONE_WORD_CHANGED.split())) == 12
    rows = [
        row("original", TWELVE, minute=0),
        row("edited", ONE_WORD_CHANGED, minute=1),
        row("different", OVERLAPPING, minute=2),
        # Under four distinct words, even the same words in another order are another comment
        # ("this is ok" / "is this ok"); from four on, a reordering is a near duplicate.
        row("short-a", "this is ok", minute=3),
        row("short-b", "is this ok", minute=4),
        row("four-a", "this is not ok", minute=5),
        row("four-b", "is this not ok", minute=6),
    ]
    config = CurationConfig(min_chars=1, near_duplicate_threshold=0.8)
    result = run(tmp_path, rows, config)
    assert result.kept_ids == ["original", "different", "short-a", "short-b", "four-a"]
    assert result.removed_by("near_duplicate") == ["edited", "four-b"]
    assert [r["detail"] for r in result.removed] == ["similar to arrival #1", "similar to arrival #6"]

    # The earlier of the two is the one kept, whichever comes first in time.
    swapped = [row("edited", ONE_WORD_CHANGED, minute=0), row("original", TWELVE, minute=1)]
    assert run(tmp_path, swapped, config, name="swapped").kept_ids == ["edited"]

    # Turned off, nothing is removed as a near duplicate.
    off = run(tmp_path, rows, OFF, name="off")
    assert off.kept_ids == [r["request_id"] for r in rows]
    assert "near_duplicate" not in off.stats.removed_by_rule


def test_user_cap_keeps_exactly_n_and_is_deterministic(tmp_path):
    rows = [row(f"power-{i:02d}", f"distinct comment number {i}", minute=i, user="power") for i in range(12)]
    rows += [row(f"light-{i}", f"light user says {i}", minute=20 + i, user=f"light-{i % 2}") for i in range(4)]
    config = CurationConfig(min_chars=1, near_duplicate_threshold=None, max_examples_per_user=3)

    result = run(tmp_path, rows, config, seed=7, name="a")
    kept_power = [i for i in result.kept_ids if i.startswith("power")]
    assert len(kept_power) == 3
    assert len([i for i in result.kept_ids if i.startswith("light")]) == 4  # at the cap or under: untouched
    assert len(result.removed_by("user_cap")) == 9
    assert result.stats.users_capped == 1

    again = run(tmp_path, rows, config, seed=7, name="b")
    assert again.kept_ids == result.kept_ids
    # The sample is not simply the first rows, and other seeds draw other samples.
    samples = {
        tuple(i for i in run(tmp_path, rows, config, seed=seed, name=f"s{seed}").kept_ids if i.startswith("power"))
        for seed in (1, 2, 3, 4)
    }
    assert len(samples | {tuple(kept_power)}) > 1


def test_pii_scrubbing_rewrites_inputs_and_counts(tmp_path):
    rows = [
        row("email", "mail me at jane.doe+x@example.co.uk please", minute=0),
        row("phone", "call me on 415-867-2291 tonight", minute=1),
        row("intl-phone", "or +44 20 7946 0958 or (212) 736-5000 at work", minute=2),
        row("card", "my card is 4111 1111 1111 1111 oops", minute=3),
        row("iban", "pay DE89 3704 0044 0532 0130 00 from 203.0.113.45", minute=4),
        row("clean", "nothing personal in this one, order 2024-00815", minute=5),
        # Scrubbed too, although a rule removes it: the removed table must not keep the address.
        row("dropped", "spam jane@example.com", minute=6),
    ]
    config = CurationConfig(min_chars=1, near_duplicate_threshold=None, scrub_pii=True, drop_patterns={"spam": "^spam"})
    result = run(tmp_path, rows, config)
    texts = {r["request_id"]: r["input"] for r in result.kept}
    assert texts == {
        "email": "mail me at <EMAIL> please",
        "phone": "call me on <PHONE> tonight",
        "intl-phone": "or <PHONE> or <PHONE> at work",
        "card": "my card is <CARD> oops",
        "iban": "pay <IBAN> from <IP>",
        "clean": "nothing personal in this one, order 2024-00815",
    }
    # Items replaced, by kind (a text with two phone numbers counts two).
    assert result.stats.pii_scrubbed == {"email": 2, "iban": 1, "card": 1, "ip": 1, "phone": 3}
    assert result.removed_by("pattern:spam") == ["dropped"]
    assert [r["input_excerpt"] for r in result.removed] == ["spam <EMAIL>"]

    # Scrubbing runs before de-duplication: comments that differ only in their PII are duplicates.
    twins = [row("a", "write to a@b.example now", minute=0), row("b", "write to zz@q.example now", minute=1)]
    twin_result = run(tmp_path, twins, config, name="twins")
    assert twin_result.kept_ids == ["a"]
    assert twin_result.removed_by("exact_duplicate") == ["b"]

    # Off, inputs are left alone.
    off = run(tmp_path, rows[:4], OFF, name="off")
    assert [r["input"] for r in off.kept] == [r["input"] for r in rows[:4]]
    assert off.stats.pii_scrubbed == {}


def test_label_balancing(tmp_path):
    rows = [row(f"neg-{i}", f"benign comment {i}", minute=i, label=0) for i in range(7)]
    rows += [row(f"pos-{i}", f"toxic comment {i}", minute=10 + i, label=1) for i in range(3)]
    config = CurationConfig(min_chars=1, near_duplicate_threshold=None, balance_labels=True)
    result = run(tmp_path, rows, config, seed=3)
    assert result.stats.label_counts == {0: 3, 1: 3}
    assert all(i.startswith("neg") for i in result.removed_by("label_balance"))
    assert len(result.removed_by("label_balance")) == 4
    assert run(tmp_path, rows, config, seed=3, name="again").kept_ids == result.kept_ids
    # Off by default: the mix is left as the traffic made it.
    assert run(tmp_path, rows, OFF, name="off").stats.label_counts == {0: 7, 1: 3}


def test_duplicate_request_ids_across_days_keep_the_earliest(tmp_path):
    day1 = [row("r-1", "first day copy", minute=0), row("r-2", "only on day one", minute=1)]
    day2 = [row("r-1", "second day copy", minute=24 * 60), row("r-3", "only on day two", minute=24 * 60 + 1)]
    # Day two's file is listed first: arrival is by time, not by file.
    paths = [write(tmp_path / "d2.parquet", day2), write(tmp_path / "d1.parquet", day1)]
    result = run(tmp_path, paths)
    assert result.kept_ids == ["r-1", "r-2", "r-3"]
    assert result.kept[0]["input"] == "first day copy"
    assert [(r["request_id"], r["rule"], r["input_excerpt"]) for r in result.removed] == [
        ("r-1", "duplicate_request_id", "second day copy")
    ]


def test_all_rules_together_account_for_every_row(tmp_path):
    rows = [
        row("a", "a perfectly normal comment about the game", minute=0, user="p"),
        row("a", "a perfectly normal comment about the game", minute=1, user="p"),  # same request id
        row("b", "hi", minute=2, user="p"),  # too short
        row("c", "z" * 300, minute=3, user="p"),  # too long
        row("d", "http://spam.example/x", minute=4, user="q"),  # pattern
        row("e", "A perfectly NORMAL comment, about the game!", minute=5, user="q"),  # exact duplicate
        row("f", TWELVE, minute=6, user="q"),
        row("g", ONE_WORD_CHANGED, minute=7, user="q"),  # near duplicate
        *[
            row(f"p{i}", f"power user comment variant {i} {i * 7}", minute=10 + i, user="p", label=i % 2)
            for i in range(6)
        ],
        row("t1", "you are a clown", minute=30, user="r", label=1),
        row("t2", "what a loser honestly", minute=31, user="s", label=1),
    ]
    config = CurationConfig(
        min_chars=3,
        max_chars=200,
        drop_patterns={"url_only": r"^\s*https?://\S+\s*$"},
        max_examples_per_user=3,
        near_duplicate_threshold=0.8,
        scrub_pii=True,
        balance_labels=True,
    )
    result = run(tmp_path, rows, config, seed=11)
    stats = result.stats
    assert stats.rows_in == len(rows)
    for rule, ids in {
        "duplicate_request_id": ["a"],
        "too_short": ["b"],
        "too_long": ["c"],
        "pattern:url_only": ["d"],
        "exact_duplicate": ["e"],
        "near_duplicate": ["g"],
    }.items():
        assert result.removed_by(rule) == ids, rule
        assert stats.removed_by_rule[rule] == len(ids)
    # "p" has the kept "a" and six variants: capped at three.
    assert (
        sum(1 for r in result.kept + [r for r in result.removed if r["rule"] == "label_balance"] if r["user_id"] == "p")
        == 3
    )
    assert stats.removed_by_rule["user_cap"] == 4
    assert stats.label_counts[0] == stats.label_counts[1]
    # Every input row is either kept or removed once (the duplicate id once each way).
    out = Counter(result.kept_ids) + Counter(r["request_id"] for r in result.removed)
    assert out == Counter(r["request_id"] for r in rows)


def _ragged(sets: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(sets) + 1, np.int64)
    np.cumsum([len(s) for s in sets], out=offsets[1:])
    return np.concatenate([np.array(s, np.int64) for s in sets]), offsets


def test_minhash_functions_are_independent_and_unbiased():
    # 300 pairs at Jaccard exactly 0.5 (20 shared words of 40): each function agrees with
    # probability 0.5, so per pair the agreeing count is Binomial(48, 0.5) when the functions are
    # independent. Functions derived from one hash by XOR agree or disagree together: a
    # variance far above 48 * 0.25 = 12.
    rng = np.random.default_rng(3)
    sets = []
    for _ in range(300):
        words = rng.choice(50_000, size=40, replace=False).tolist()
        sets += [words[:30], words[10:]]
    ids, offsets = _ragged(sets)
    signature = minhash.signatures(ids, offsets)
    pairs = np.arange(600).reshape(300, 2)
    agreeing = (signature[pairs[:, 0]] == signature[pairs[:, 1]]).sum(axis=1)
    assert abs(agreeing.mean() / signature.shape[1] - 0.5) < 0.02
    assert 8 < agreeing.var() < 17
    # Scored on the values' low bytes, a pair agrees on a function with probability
    # 0.5 + 0.5 / 256, and never on fewer functions than the full values agree on.
    _, packed = minhash.agreeing_at_least(minhash.packed_signature(signature), pairs, signature.shape[1], 0)
    assert (packed >= agreeing).all()
    expected = minhash.agreement_probability(0.5) * signature.shape[1]
    assert abs(packed.mean() - expected) < 0.02 * signature.shape[1]


def test_packed_scores_count_agreeing_low_bytes_exactly():
    # Any width, padding included: the count equals a byte-by-byte comparison.
    rng = np.random.default_rng(8)
    for functions in (48, 80, 13):
        signature = rng.integers(0, 2**32, size=(500, functions), dtype=np.uint64).astype(np.uint32)
        # Force many agreements, on the full value and on the low byte alone.
        signature[250:, : functions // 2] = signature[:250, : functions // 2]
        signature[250:, -3:] = (signature[:250, -3:] & 0xFF) | np.uint32(0xABCD00)
        pairs = np.stack([rng.integers(0, 500, 2_000), rng.integers(0, 500, 2_000)], 1)
        pairs[:500] = np.stack([np.arange(250), np.arange(250, 500)], 1).repeat(2, 0)
        low = signature & 0xFF
        expected = (low[pairs[:, 0]] == low[pairs[:, 1]]).sum(axis=1)
        kept, scored = minhash.agreeing_at_least(minhash.packed_signature(signature), pairs, functions, 0)
        assert np.array_equal(kept, pairs) and np.array_equal(scored, expected)
        # Filtered: exactly the pairs at the least count or above, in order, their counts plus those given.
        least = functions // 2
        kept, scored = minhash.agreeing_at_least(
            minhash.packed_signature(signature), pairs, functions, least, counted=np.ones(len(pairs), np.int16)
        )
        assert np.array_equal(kept, pairs[expected + 1 >= least]) and np.array_equal(scored, expected[expected + 1 >= least] + 1)


def test_exact_jaccard_is_the_word_set_rule():
    rng = np.random.default_rng(5)
    sets = [sorted(set(rng.integers(0, 30, size=rng.integers(1, 25)).tolist())) for _ in range(200)]
    ids, offsets = _ragged(sets)
    pairs = rng.integers(0, 200, size=(500, 2))
    exact = minhash.exact_jaccard(ids, offsets, pairs)
    expected = [jaccard(frozenset(sets[a]), frozenset(sets[b])) for a, b in pairs.tolist()]
    assert np.allclose(exact, expected)


def test_near_duplicates_in_a_huge_bucket_cost_a_bounded_number_of_pairs():
    # 3,000 copies of one template with one slot filled in: every text lands in the same buckets.
    base = list(range(100, 130))
    sets = [[*base, 1_000 + i] for i in range(3_000)]
    ids, offsets = _ragged(sets)
    keys = minhash.band_keys(minhash.signatures(ids, offsets))
    order, positions = minhash.bucket_positions(keys[:, 0], np.ones(3_000, bool))
    pairs = order[positions]
    assert len(pairs) <= 3_000 * (minhash.BUCKET_HEADS + minhash.BUCKET_WINDOW)
    assert (pairs[:, 0] < pairs[:, 1]).all()
    # Small buckets: every pair. Four texts in one bucket give all six pairs.
    order, positions = minhash.bucket_positions(np.array([7, 7, 9, 7, 7], np.uint64), np.ones(5, bool))
    small = order[positions]
    assert sorted(map(tuple, small.tolist())) == [(0, 1), (0, 3), (0, 4), (1, 3), (1, 4), (3, 4)]
    # Each is a near duplicate (Jaccard 30/32) of the first, which alone is kept.
    similar_to = minhash.near_duplicates(ids, offsets, 0.8)
    assert similar_to[0] == -1 and (similar_to[1:] >= 0).all()
    assert (similar_to[1:] < np.arange(1, 3_000)).all()


def test_near_duplicate_recall_and_threshold_are_exact():
    # 400 texts of 20 random words, each followed later by an edit at Jaccard 0.82 (two words
    # of twenty swapped: 18/22) and one at 0.67 (four swapped: 16/24).
    rng = np.random.default_rng(11)
    sets, near, far = [], [], []
    for _ in range(400):
        words = rng.choice(50_000, size=28, replace=False).tolist()
        sets.append(words[:20])
        near.append(words[2:20] + words[20:22])
        far.append(words[4:20] + words[22:26])
    ids, offsets = _ragged(sets + near + far)
    similar_to = minhash.near_duplicates(ids, offsets, 0.8)
    assert (similar_to[400:800] == np.arange(400)).mean() >= 0.99
    assert (similar_to[800:] == -1).all()
    assert (similar_to[:400] == -1).all()


def test_least_agreeing_is_the_binomial_quantile():
    from math import comb

    for functions, threshold in ((48, 0.8), (128, 0.8), (128, 0.5), (20, 0.95)):
        count = minhash.least_agreeing(functions, threshold)

        def below(c: int, k: int = functions, t: float = threshold) -> float:
            return sum(comb(k, x) * t**x * (1 - t) ** (k - x) for x in range(c))

        # A pair at the threshold falls below the count at most that often, and one more would not hold.
        assert below(count) <= minhash.MISS_PROBABILITY < below(count + 1)
    assert minhash.least_agreeing(10, 1.0) == 10
    with pytest.raises(ValueError, match="Jaccard threshold"):
        minhash.least_agreeing(48, 0.0)


def test_signatures_are_the_same_whether_hashed_per_word_or_per_occurrence():
    # Three texts over a vocabulary of 200,000 ids hold fewer words than the vocabulary, so their
    # functions are evaluated per occurrence; with the vocabulary's size in a text, per word.
    rng = np.random.default_rng(2)
    sets = [sorted(rng.choice(200_000, size=n, replace=False).tolist()) for n in (5, 40, 17)]
    ids, offsets = _ragged(sets)
    few = minhash.signatures(ids, offsets)
    dense = np.arange(200_001)
    many = minhash.signatures(np.concatenate([ids, dense]), np.append(offsets, offsets[-1] + len(dense)))
    assert np.array_equal(few, many[:3])
    for row, words in enumerate(sets):
        expected = (
            minhash._mix(np.array(words, np.uint64)[:, None] ^ minhash.function_seeds()[None, :]) >> np.uint64(32)
        ).min(axis=0)
        assert np.array_equal(few[row], expected.astype(np.uint32))
    # The low bytes alone, for scoring, are those of the full values.
    low = minhash.signatures(ids, offsets, low_bytes=True)
    assert low.dtype == np.uint8 and np.array_equal(low, few & 0xFF)


def test_candidates_are_ranked_by_later_text_then_agreement_then_earliest_text():
    rng = np.random.default_rng(4)
    for count in (50, 3_000_000, 2**28):  # the last too many texts for one 64-bit key
        pairs = np.stack([rng.integers(0, count, 5_000), rng.integers(0, count, 5_000)], 1).astype(np.int32)
        pairs[:2_000, 1] = pairs[0, 1]  # many candidates of one later text
        agreeing = rng.integers(0, 129, 5_000).astype(np.int16)
        ranked = minhash._by_later_most_agreeing_first(pairs, agreeing, count)
        expected = np.lexsort((pairs[:, 0], -agreeing, pairs[:, 1]))
        # Equal keys (a repeated pair) may come in either order; the keys' sequence may not.
        key = np.stack([pairs[:, 1], -agreeing, pairs[:, 0]], 1)
        assert np.array_equal(key[ranked], key[expected])
