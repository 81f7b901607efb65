"""The normalised text of an input and its word set: the one rule every comparison of inputs uses.

An input's normalised text is the text with each character lower-cased on its own (as DuckDB's
``lower`` does it: no final sigma, "İ" -> "i"), every run of characters that are not letters
or numbers (Unicode categories L and N) folded into one space, and trimmed. Its words are what the
spaces separate; two texts are alike by the Jaccard similarity of their word sets (1.0 for two
texts without words). The rule is written here, in the forms its users need, and
``test_normalise.py`` holds them to the same answers on hostile text:

- SQL, for DuckDB's set work over whole tables (curation, test sets, the training set):
  :func:`normalised_text_sql`, :func:`word_set_sql`, :func:`jaccard_sql`;
- Python, for a few texts at a time (the synthetic rewrites' filter): :func:`normalised_text`,
  :func:`word_set`, :func:`jaccard`;
- a fast DuckDB function for ASCII texts, :func:`normalise_ascii`. In SQL the rule is one
  ``regexp_replace``, but RE2's global replace costs over a microsecond per text in DuckDB, and
  the pipeline normalises every input three times. For ASCII text, nearly all of it, the same
  result is a byte-table lookup and a collapse of separator runs, vectorised with numpy over a
  whole vector of texts; other texts are left to the regex (the function returns NULL).
"""

from __future__ import annotations

import re

import duckdb
import duckdb.sqltypes
import numpy as np
import pyarrow as pa

#: The name the function is registered under on every connection from ``duck.connect``.
NORMALISE_ASCII_FUNCTION = "distill_normalise_ascii"

# What separates words, in RE2's syntax and in Python's: in a str pattern ``\w`` is a letter, a
# digit or "_", so ``[\W_]`` is "neither a letter nor a digit". Characters newer than Python's
# Unicode tables (unassigned for it) are separators in Python and may be letters in RE2.
_SEPARATORS_RE2 = r"[^\p{L}\p{N}]+"
_SEPARATORS = re.compile(r"[\W_]+")


def normalised_text(text: str) -> str:
    """The normalised text of ``text`` (see the module's docstring); what ``normalised_text_sql`` gives."""
    # Character by character, as DuckDB lowers: str.lower() on the whole text would end a word in
    # final sigma, and its "İ" is two characters; the first is the one-character mapping.
    lowered = "".join(char.lower()[0] for char in text)
    return _SEPARATORS.sub(" ", lowered).strip(" ")


def word_set(text: str) -> frozenset[str]:
    """The distinct words of ``text``'s normalised text."""
    return frozenset(normalised_text(text).split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """The Jaccard similarity of two word sets; 1.0 when both are empty."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def normalised_text_sql(column: str) -> str:
    """SQL for the normalised text of ``column``.

    Needs a connection from ``duck.connect``, which registers the fast path for ASCII texts; the
    regex gives the same text, slower, for any text.
    """
    regex = f"trim(regexp_replace(lower({column}), '{_SEPARATORS_RE2}', ' ', 'g'))"
    return f"coalesce({NORMALISE_ASCII_FUNCTION}({column}), {regex})"


def word_set_sql(normalised: str) -> str:
    """SQL for the word set (a list of distinct words) of an already normalised text."""
    return f"list_distinct(list_filter(string_split({normalised}, ' '), lambda w: w <> ''))"


def jaccard_sql(a: str, b: str) -> str:
    """SQL for the Jaccard similarity of two word sets (from ``word_set_sql``); 1.0 when both are empty."""
    union = f"len(list_distinct(list_concat({a}, {b})))"
    return f"CASE WHEN {union} = 0 THEN 1.0 ELSE len(list_intersect({a}, {b})) / {union} END"


_SEPARATOR = 0x20
# Each ASCII byte's normalised form: letters lower-cased, digits kept, anything else a separator.
_FOLD = np.full(256, _SEPARATOR, dtype=np.uint8)
_FOLD[ord("0") : ord("9") + 1] = np.arange(ord("0"), ord("9") + 1)
_FOLD[ord("a") : ord("z") + 1] = np.arange(ord("a"), ord("z") + 1)
_FOLD[ord("A") : ord("Z") + 1] = np.arange(ord("a"), ord("z") + 1)


def normalise_ascii(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The normalised text of each ASCII text; NULL for NULL and for any text that is not ASCII."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = texts.cast(pa.large_string())
    count = len(texts)
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64, count=count + 1, offset=texts.offset * 8)
    buffer = texts.buffers()[2]
    data = np.frombuffer(buffer, dtype=np.uint8)[offsets[0] : offsets[-1]] if buffer else np.zeros(0, np.uint8)
    offsets = offsets - offsets[0]
    nonempty = np.diff(offsets) > 0
    starts = offsets[:-1][nonempty]

    folded = _FOLD[data]
    word = folded != _SEPARATOR
    # Keep every letter and digit, and the first separator after one (within the same text).
    keep = word.copy()
    keep[1:] |= word[:-1]
    keep[starts] = word[starts]
    lengths = np.zeros(count, dtype=np.int64)
    is_ascii = np.ones(count, dtype=bool)
    if len(starts):
        lengths[nonempty] = np.add.reduceat(keep.view(np.uint8), starts, dtype=np.int64)
        is_ascii[nonempty] = np.add.reduceat((data >= 0x80).view(np.uint8), starts, dtype=np.int64) == 0
    normalised = folded[keep]
    # A text ending in separators kept the first of them: drop it (the trim).
    ends = np.cumsum(lengths)
    trailing = np.zeros(count, dtype=bool)
    has_text = lengths > 0
    trailing[has_text] = normalised[ends[has_text] - 1] == _SEPARATOR
    if trailing.any():
        kept = np.ones(len(normalised), dtype=bool)
        kept[ends[trailing] - 1] = False
        normalised = normalised[kept]
        lengths[trailing] -= 1
    new_offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    valid = is_ascii & texts.is_valid().to_numpy(zero_copy_only=False)
    return pa.Array.from_buffers(
        pa.large_string(),
        count,
        [pa.py_buffer(np.packbits(valid, bitorder="little")), pa.py_buffer(new_offsets), pa.py_buffer(normalised)],
    )


def register(con: duckdb.DuckDBPyConnection) -> None:
    """Make ``NORMALISE_ASCII_FUNCTION`` callable in ``con``'s SQL."""
    con.create_function(
        NORMALISE_ASCII_FUNCTION,
        normalise_ascii,
        [duckdb.sqltypes.VARCHAR],
        duckdb.sqltypes.VARCHAR,
        type="arrow",
        null_handling="special",
        side_effects=False,
    )
