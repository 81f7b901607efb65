"""Near-duplicate texts by word-set Jaccard: MinHash signatures, LSH buckets, exact verification.

A text arrives as the ids of its distinct words (its word set, as
:mod:`distill_pipeline.core.normalise` defines it; an id is the word's index in a vocabulary). Its
signature is, for each of ``BANDS * ROWS`` hash functions, the least value the function gives
over the set; two sets agree on one function with probability equal to their Jaccard
similarity. Function ``i`` is the splitmix64 finaliser applied to the word's id XOR a 64-bit seed
of its own, drawn from one seeded generator: the finaliser is a bijection with full avalanche,
so the functions behave as independent random orders of the words. (DuckDB's ``hash(word, i)``
combines the two hashes by XOR, which only flips the same bits of every word's hash: its minima
are correlated across functions.) The functions are evaluated once per distinct word, and a
signature is a gather and a running minimum over blocks of texts padded to a common length.

Signatures are cut into ``BANDS`` bands of ``ROWS`` values; texts whose band agrees share a
bucket, so a pair at Jaccard ``j`` shares at least one bucket with probability
``1 - (1 - j**ROWS)**BANDS`` (0.998 at 0.8, 0.54 at 0.5). In a bucket each text is compared
with the bucket's first ``BUCKET_HEADS`` members and the ``BUCKET_WINDOW`` just before it: every
pair of a bucket of up to 17 members, and a bounded number per text in the huge buckets of
templated traffic.

A candidate then passes two statistical filters before the exact check. The number of functions
on which two signatures agree is Binomial(k, j); a pair at the threshold falls below
:func:`least_agreeing` with probability at most ``MISS_PROBABILITY``, so dropping the
candidates below it loses a true pair that rarely. The first filter reads the ``BANDS * ROWS``
functions of the buckets; the candidates it keeps are scored again on ``REFINE_FUNCTIONS`` more
(computed only for the texts they name), where an estimate from 128 functions tells a pair at
0.7 from one at 0.8 far more often than one from 48 does: in templated traffic most candidates
lie between the two, and each costs an exact comparison otherwise. Candidates are scored on the
lowest byte of each function's value, eight functions to a 64-bit word: two different minima
still agree there once in 256, so a pair at Jaccard ``j`` agrees on a function with probability
``j + (1 - j) / 256``, and the bound is taken at that probability. The rows are scored in each
band's bucket order (a bucket's members side by side), so the gathers read memory nearly in
sequence, and the chunks of pairs run on every core. The rest are verified with
the exact Jaccard of the word sets, so every pair reported reaches the threshold; a pair found
wanting is not verified again when it shares another band.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BANDS = 12
ROWS = 4
#: In a bucket, each text is compared with the bucket's first ``BUCKET_HEADS`` members and with
#: the ``BUCKET_WINDOW`` that arrived just before it: every pair of a bucket of up to
#: ``BUCKET_HEADS + BUCKET_WINDOW + 1`` members, and a bounded number per text in a larger one.
BUCKET_HEADS = 8
BUCKET_WINDOW = 8
#: Candidates of one text verified exactly per band, the most similar by signature first.
ATTEMPTS_PER_BAND = 4
#: The most probability with which each statistical filter drops a pair exactly at the threshold
#: (a pair above it is dropped less often still).
MISS_PROBABILITY = 1e-4
#: Bits of each function's value compared when candidates are scored (see ``packed_signature``).
SCORE_BITS = 8
#: Functions added for the second filter, on the candidates the first one kept.
REFINE_FUNCTIONS = 80
SIGNATURE_SEED = 20_240_611
#: Texts whose signatures are computed at a time: bounds the gathered values to a few MB.
CHUNK_ROWS = 2048
#: Candidate pairs scored at a time.
SCORE_CHUNK_PAIRS = 1 << 16
#: Pairs whose word sets are compared exactly at a time.
EXACT_CHUNK_PAIRS = 1 << 16
#: Hash functions evaluated over the vocabulary at a time: bounds that table to 64 bytes a word.
SEED_BLOCK = 16

_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise over uint64 (wrapping arithmetic is the point)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _each_chunk(work: Callable[[int], None], total: int, step: int) -> None:
    """``work(start)`` for each chunk ``start`` of ``range(0, total, step)``, on every core: numpy
    releases the GIL in the gathers, bitwise operations, sorts and reductions the chunks do."""
    starts = range(0, total, step)
    if len(starts) < 2:
        for start in starts:
            work(start)
        return
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(work, starts))


def function_seeds(count: int = BANDS * ROWS, seed: int = SIGNATURE_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, size=count, dtype=np.uint64)


def signatures(
    word_ids: np.ndarray, offsets: np.ndarray, seeds: np.ndarray | None = None, *, low_bytes: bool = False
) -> np.ndarray:
    """The MinHash signature (uint32, one column per function) of each text.

    ``word_ids`` holds every text's distinct word ids (a word's index in a vocabulary) back to
    back; text ``i``'s are ``word_ids[offsets[i]:offsets[i + 1]]``, and no text is empty. With
    ``low_bytes``, only each value's lowest byte (uint8), all that scoring reads
    (``packed_signature``), in a quarter of the memory.
    """
    seeds = function_seeds() if seeds is None else seeds
    count = len(offsets) - 1
    lengths = np.diff(offsets)
    if count == 0:
        return np.zeros((0, len(seeds)), np.uint8 if low_bytes else np.uint32)
    if lengths.min() <= 0:
        raise ValueError("every text needs at least one word for a signature")
    # The functions are evaluated once per word of the vocabulary, or once per occurrence when
    # the texts hold fewer words than the vocabulary (a few texts of a large day).
    vocabulary_size = int(word_ids.max()) + 1
    per_occurrence = len(word_ids) < vocabulary_size
    hashed = word_ids.astype(np.uint64) if per_occurrence else np.arange(vocabulary_size, dtype=np.uint64)
    # The row after the last pads short texts: no function's value is above it.
    padding = len(hashed)
    result = np.empty((count, len(seeds)), np.uint8 if low_bytes else np.uint32)
    # Texts of similar length are padded together to a common width: a gather and a min over a
    # dense block is several times faster than numpy's reduceat over ragged segments.
    by_length = np.argsort(lengths, kind="stable")
    for block in range(0, len(seeds), SEED_BLOCK):
        columns = slice(block, block + SEED_BLOCK)
        values = np.empty((padding + 1, len(seeds[columns])), np.uint32)
        values[:padding] = _mix(hashed[:, None] ^ seeds[None, columns]) >> np.uint64(32)
        values[padding] = np.iinfo(np.uint32).max

        def chunk(start: int, values: np.ndarray = values, columns: slice = columns) -> None:
            rows = by_length[start : start + CHUNK_ROWS]
            width = int(lengths[rows].max())
            column = np.arange(width)
            inside = column[None, :] < lengths[rows][:, None]
            positions = np.minimum(offsets[rows][:, None] + column[None, :], len(word_ids) - 1)
            padded = np.where(inside, positions if per_occurrence else word_ids[positions], padding)
            accumulated = values[padded[:, 0]]
            for position in range(1, width):
                np.minimum(accumulated, values[padded[:, position]], out=accumulated)
            result[rows, columns] = (accumulated & 0xFF).astype(np.uint8) if low_bytes else accumulated

        _each_chunk(chunk, count, CHUNK_ROWS)
    return result


def least_agreeing(functions: int, threshold: float, miss: float = MISS_PROBABILITY) -> int:
    """The largest count ``c`` such that a pair at Jaccard ``threshold`` agrees on fewer than
    ``c`` of ``functions`` independent functions with probability at most ``miss`` (Binomial)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"a Jaccard threshold lies in (0, 1], not {threshold}")
    below = 0.0
    for count in range(functions + 1):
        # P(X = count) for X ~ Binomial(functions, threshold), in logs to stay finite.
        if threshold == 1.0:
            probability = 1.0 if count == functions else 0.0
        else:
            probability = math.exp(
                math.lgamma(functions + 1)
                - math.lgamma(count + 1)
                - math.lgamma(functions - count + 1)
                + count * math.log(threshold)
                + (functions - count) * math.log1p(-threshold)
            )
        if below + probability > miss:
            return count
        below += probability
    return functions


def _subset(word_ids: np.ndarray, offsets: np.ndarray, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The word ids and offsets of ``texts`` alone, in that order."""
    lengths = np.diff(offsets)[texts]
    sub_offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(lengths, out=sub_offsets[1:])
    within = np.arange(sub_offsets[-1]) - np.repeat(sub_offsets[:-1], lengths)
    return word_ids[np.repeat(offsets[texts], lengths) + within], sub_offsets


def _among(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Whether each key is in ``sorted_keys`` (a binary search: no hashing of either side)."""
    if not len(sorted_keys):
        return np.zeros(len(keys), bool)
    # Searched in order, consecutive keys walk the same path through ``sorted_keys``: at millions
    # of keys a sort first is several times faster than searching them as they come.
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    found = np.searchsorted(sorted_keys, ordered)
    among = np.empty(len(keys), bool)
    among[order] = sorted_keys[np.minimum(found, len(sorted_keys) - 1)] == ordered
    return among


def band_keys(signature: np.ndarray, bands: int = BANDS, rows: int = ROWS) -> np.ndarray:
    """One 64-bit key per text and band (texts x bands) from the band's ``rows`` values.

    Two 32-bit values fill one 64-bit word without loss, so a band of four is two mixes of the
    running key, in chunks of texts on every core.
    """
    if signature.shape[1] != bands * rows:
        raise ValueError(f"a signature of {signature.shape[1]} values is not {bands} bands of {rows}")
    wide = signature.reshape(len(signature), bands, rows)
    keys = np.empty((len(signature), bands), np.uint64)

    def chunk(start: int) -> None:
        block = wide[start : start + CHUNK_ROWS * 8].astype(np.uint64)
        key = np.zeros(block.shape[:2], np.uint64)
        for row in range(0, rows, 2):
            word = block[:, :, row] << np.uint64(32)
            if row + 1 < rows:
                word |= block[:, :, row + 1]
            key = _mix(key ^ word ^ np.uint64(row + 1))
        keys[start : start + CHUNK_ROWS * 8] = key

    _each_chunk(chunk, len(signature), CHUNK_ROWS * 8)
    return keys


def bucket_positions(
    keys: np.ndarray, active: np.ndarray, *, heads: int = BUCKET_HEADS, window: int = BUCKET_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (earlier, later) of rows sharing a key, for the ``active`` later rows, as positions in
    the rows sorted by key; returns that order too (``order[positions]`` are the row indices).

    Rows are in arrival order, so the smaller index is the earlier text, and a stable sort keeps
    a bucket's members in arrival order. Each later row is paired with its bucket's first
    ``heads`` members and the ``window`` members just before it. Rows gathered in this order put
    a bucket's members side by side: scoring the pairs then reads memory nearly in sequence,
    where the row indices would jump across the whole day.
    """
    # Row indices as int32 (a day's texts fit): the pairs are the largest arrays of the rule.
    order = np.argsort(keys, kind="stable").astype(np.int32)
    sorted_keys = keys[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    positions = np.arange(len(order), dtype=np.int32)
    first = np.maximum.accumulate(np.where(starts, positions, 0))
    place = positions - first
    # The later members paired with each head, then with each distance back.
    heads_of, window_of = [], []
    later = np.flatnonzero((place >= 1) & active[order]).astype(np.int32)
    for head in range(heads):
        later = later[place[later] > head]
        heads_of.append(later)
    later = np.flatnonzero((place > heads) & active[order]).astype(np.int32)
    for distance in range(1, window + 1):
        # Members within the heads were paired above.
        later = later[place[later] - distance >= heads]
        window_of.append(later)
    # Written in place: the pairs are the largest array of a band, and a list of pieces joined
    # at the end would hold them twice.
    pairs = np.empty((sum(map(len, heads_of + window_of)), 2), np.int32)
    filled = 0
    for head, members in enumerate(heads_of):
        pairs[filled : filled + len(members), 0] = first[members] + head
        pairs[filled : filled + len(members), 1] = members
        filled += len(members)
    for distance, members in enumerate(window_of, start=1):
        pairs[filled : filled + len(members), 0] = members - distance
        pairs[filled : filled + len(members), 1] = members
        filled += len(members)
    return order, pairs


def packed_signature(signature: np.ndarray) -> np.ndarray:
    """Each function's value cut to its lowest ``SCORE_BITS`` bits, eight functions to a 64-bit word.

    Scoring a candidate reads two rows of this table: an eighth of the bytes the full values
    take (gathering the rows is the cost of scoring), compared a word at a time.
    """
    width = -(-signature.shape[1] // 8)
    low = np.zeros((len(signature), width * 8), np.uint8)
    low[:, : signature.shape[1]] = (signature & 0xFF).astype(np.uint8)
    return low.view(np.uint64)


def agreement_probability(jaccard: float) -> float:
    """The probability that a pair at ``jaccard`` agrees on one function's low ``SCORE_BITS`` bits.

    Equal minima agree; different ones (uniform, independent values) still agree on their low
    bits once in ``2**SCORE_BITS``.
    """
    return jaccard + (1.0 - jaccard) / 2**SCORE_BITS


def _count_agreeing(packed: np.ndarray, pairs: np.ndarray, functions: int) -> np.ndarray:
    """For each pair, the number of the first ``functions`` functions on which its packed rows agree."""
    # np.take gathers rows about twice as fast as fancy indexing does.
    differ = np.take(packed, pairs[:, 0], axis=0) ^ np.take(packed, pairs[:, 1], axis=0)
    # A byte's high bit ends up set exactly when the byte is zero (the functions agree): its low
    # seven bits plus 0x7F carry into the high bit unless they are all zero, and no carry
    # crosses into the next byte.
    zero = ~(((differ & _LOW7) + _LOW7) | differ | _LOW7)
    # At most 255 functions, so a count fits a byte; int16 leaves room to add and to negate. The
    # padding bytes past the last function agree in every pair.
    return np.bitwise_count(zero).sum(axis=1, dtype=np.int16) - np.int16(packed.shape[1] * 8 - functions)


def agreeing_at_least(
    packed: np.ndarray, pairs: np.ndarray, functions: int, least: int, *, counted: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs that agree on at least ``least`` functions, with their counts (plus ``counted``,
    each pair's count on other functions, where given), in their order.

    Scored and filtered a chunk at a time on every core: the counts of the pairs dropped, most
    of them, are never held, nor is a mask of the whole band.
    """
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def chunk(start: int) -> None:
        block = pairs[start : start + SCORE_CHUNK_PAIRS]
        agreeing = _count_agreeing(packed, block, functions)
        if counted is not None:
            agreeing += counted[start : start + SCORE_CHUNK_PAIRS]
        keep = agreeing >= least
        kept[start] = (block[keep], agreeing[keep])

    _each_chunk(chunk, len(pairs), SCORE_CHUNK_PAIRS)
    starts = sorted(kept)
    if not starts:
        return pairs[:0], np.zeros(0, np.int16)
    return np.concatenate([kept[start][0] for start in starts]), np.concatenate([kept[start][1] for start in starts])


def exact_jaccard(word_ids: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The exact Jaccard similarity of each pair's word sets (texts hold distinct word ids).

    Both texts' ids are tagged with the pair's index and sorted together: a word of both
    appears twice in a row, so the intersection is a count of adjacent equal keys. Pairs are
    taken ``EXACT_CHUNK_PAIRS`` at a time, which bounds the tagged ids to a few MB.
    """
    out = np.empty(len(pairs), np.float64)

    def chunk(start: int) -> None:
        block = pairs[start : start + EXACT_CHUNK_PAIRS]
        # Each pair's two texts, back to back.
        words, bounds = _subset(word_ids, offsets, block.ravel())
        sizes = bounds[2::2] - bounds[:-1:2]
        tags = np.repeat(np.arange(len(block), dtype=np.uint64), sizes)
        # numpy's stable sort (timsort for 64-bit keys) finds the tags already in order and only
        # sorts within each pair's words: several times faster than its default here.
        keys = np.sort((tags << np.uint64(32)) | words.astype(np.uint64), kind="stable")
        shared = keys[1:][keys[1:] == keys[:-1]] >> np.uint64(32)
        intersection = np.bincount(shared.astype(np.int64), minlength=len(block))
        out[start : start + EXACT_CHUNK_PAIRS] = intersection / (sizes - intersection)

    _each_chunk(chunk, len(pairs), EXACT_CHUNK_PAIRS)
    return out


def _by_later_most_agreeing_first(pairs: np.ndarray, agreeing: np.ndarray, count: int) -> np.ndarray:
    """The order that groups ``pairs`` by later text, the most agreeing (then the earliest) first.

    One sort of a 64-bit key (later, 255 - agreeing, earlier) where ``count`` texts leave room for
    it, up to 2**27 texts: about a third of the cost of sorting the three keys one after another.
    """
    bits = max(int(count - 1).bit_length(), 1)
    if 2 * bits + 8 > 63:
        return np.lexsort((pairs[:, 0], -agreeing, pairs[:, 1]))
    key = pairs[:, 1].astype(np.int64) << np.int64(bits + 8)
    key |= (255 - agreeing).astype(np.int64) << np.int64(bits)
    key |= pairs[:, 0]
    return np.argsort(key)


def near_duplicates(
    word_ids: np.ndarray,
    offsets: np.ndarray,
    threshold: float,
    *,
    heads: int = BUCKET_HEADS,
    window: int = BUCKET_WINDOW,
    attempts: int = ATTEMPTS_PER_BAND,
) -> np.ndarray:
    """For each text, the index of an earlier text whose word set is at Jaccard >= ``threshold``
    with its own (verified exactly), or -1.

    The bands are taken one at a time, and a text found to be a near duplicate is no longer a
    later member in the next bands (it may still be the earlier one). Within a band each later
    text's candidates are verified in rounds, the most similar by signature first, until one is
    confirmed: a templated bucket costs about one exact comparison per member.
    """
    count = len(offsets) - 1
    similar_to = np.full(count, -1, np.int64)
    if count < 2:
        return similar_to
    if word_ids.min(initial=0) < 0 or word_ids.max(initial=0) >= 2**32 or count >= 2**31:
        raise ValueError("word ids must be non-negative and fit in 32 bits, and text indices in 31")
    # Gathered by every signature and exact check: half the bytes of int64. Non-negative int32
    # ids (Arrow's dictionary indices) are the same bits: viewed, not copied.
    word_ids = word_ids.view(np.uint32) if word_ids.dtype == np.int32 else word_ids.astype(np.uint32, copy=False)
    seeds = function_seeds(BANDS * ROWS + REFINE_FUNCTIONS)
    signature = signatures(word_ids, offsets, seeds[: BANDS * ROWS])
    keys = band_keys(signature)
    functions = signature.shape[1]
    packed = packed_signature(signature)
    del signature
    first_filter = least_agreeing(functions, agreement_probability(threshold))
    second_filter = least_agreeing(functions + REFINE_FUNCTIONS, agreement_probability(threshold))
    # The added functions' values, filled in for the texts some candidate has named so far.
    refined = np.zeros((count, -(-REFINE_FUNCTIONS // 8)), np.uint64)
    is_refined = np.zeros(count, bool)
    # Pairs verified and found wanting, as (earlier << 32 | later), sorted.
    wanting = np.zeros(0, np.uint64)
    for band in range(keys.shape[1]):
        order, positions = bucket_positions(keys[:, band], similar_to < 0, heads=heads, window=window)
        positions, agreeing = agreeing_at_least(np.take(packed, order, axis=0), positions, functions, first_filter)
        if not len(positions):
            continue
        named = np.zeros(count, bool)
        named[order[positions.ravel()]] = True
        new = np.flatnonzero(named & ~is_refined)
        if len(new):
            added = signatures(*_subset(word_ids, offsets, new), seeds[functions:], low_bytes=True)
            refined[new] = packed_signature(added)
            is_refined[new] = True
        # In the bucket order too (a row not named is never read: every text of a pair is named).
        by_bucket = np.take(refined, order, axis=0)
        positions, agreeing = agreeing_at_least(by_bucket, positions, REFINE_FUNCTIONS, second_filter, counted=agreeing)
        # Released before the next band's copy is made, not after: the two would be held at once.
        del by_bucket
        pairs = order[positions]
        pair_keys = (pairs[:, 0].astype(np.uint64) << np.uint64(32)) | pairs[:, 1].astype(np.uint64)
        # Looked up only for the pairs both filters kept: the memo is searched for a few.
        fresh = ~_among(pair_keys, wanting)
        pairs, agreeing, pair_keys = pairs[fresh], agreeing[fresh], pair_keys[fresh]
        if not len(pairs):
            continue
        ranked = _by_later_most_agreeing_first(pairs, agreeing, count)
        pairs, pair_keys = pairs[ranked], pair_keys[ranked]
        group_start = np.ones(len(pairs), dtype=bool)
        group_start[1:] = pairs[1:, 1] != pairs[:-1, 1]
        rank = np.arange(len(pairs)) - np.maximum.accumulate(np.where(group_start, np.arange(len(pairs)), 0))
        found_wanting = [np.zeros(0, np.uint64)]
        for attempt in range(min(int(rank.max()) + 1, attempts)):
            trying = (rank == attempt) & (similar_to[pairs[:, 1]] < 0)
            if not trying.any():
                continue
            close = exact_jaccard(word_ids, offsets, pairs[trying]) >= threshold
            confirmed = pairs[trying][close]
            similar_to[confirmed[:, 1]] = confirmed[:, 0]
            found_wanting.append(pair_keys[trying][~close])
        # Two sorted runs: numpy's stable sort (timsort for 64-bit keys) merges them in one
        # linear pass, where sorting the whole memo again each band would grow with the bands.
        wanting = np.sort(np.concatenate([wanting, np.sort(np.concatenate(found_wanting))]), kind="stable")
    return similar_to
