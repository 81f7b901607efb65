"""One normalisation rule in three forms: the fast ASCII path, the SQL regex and Python all agree."""

from __future__ import annotations

import itertools
import random
import sys
import unicodedata

import pyarrow as pa
import pytest

from distill_pipeline.core import duck
from distill_pipeline.core.normalise import (
    NORMALISE_ASCII_FUNCTION,
    jaccard,
    jaccard_sql,
    normalise_ascii,
    normalised_text,
    normalised_text_sql,
    word_set,
    word_set_sql,
)

REGEX = "trim(regexp_replace(lower(text), '[^\\p{L}\\p{N}]+', ' ', 'g'))"

# Case, punctuation and Unicode that a naive rule gets wrong on one side only.
TRICKY = [
    "",
    "   ",
    "!!!",
    "Hello,   World!",
    "x_y __init__",
    "C3-PO",
    "ΣΑΣ ΟΔΟΣ",  # str.lower() would end each word in a final sigma
    "İSTANBUL İ",  # str.lower() makes "İ" two characters
    "Straße STRASSE ẞ",
    "café cafe\u0301",  # composed, and e + combining accent (a mark: a separator)
    "naïve ǅungla ﬁne",
    "日本語のテキスト、です。",
    "٣ apples, x² and Ⅻ",
    "tab\there\nnew\r\nline",
    "\u00a0nbsp\u3000ideographic\u2009thin",
    "zero\u200bwidth\u00adsoft",
    "emoji 🦆 duck 👍🏽",
    "\x00null\x7f",
    "--lol-- LOL lol",
]


def every_character() -> list[str]:
    """Each character Python's Unicode tables know (RE2's may be newer), between two letters."""
    return [
        f"a{char}B{char}"
        for char in map(chr, range(sys.maxunicode + 1))
        if unicodedata.category(char) not in ("Cn", "Cs")
    ]


def sql_values(expression: str, texts: list[str]) -> list:
    """``expression`` (over the column ``text``) for each text, on a connection from ``duck.connect``."""
    source = pa.table({"i": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())})
    con = duck.connect()
    try:
        con.register("source", source)
        return [row[0] for row in con.execute(f"SELECT {expression} FROM source ORDER BY i").fetchall()]
    finally:
        con.close()


def texts_to_compare() -> list[str | None]:
    rng = random.Random(7)
    alphabet = [*"aZq09 ,.!?-_'\"\t\n\r", "\x00", "\x7f", "é", "İ", "ß", "٣", "🦆", "\u00a0", "\u3000"]
    fuzzed = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))) for _ in range(5000)]
    edge = [None, "", " ", "   ", "a", " a", "a ", "  Hello,   World!  ", "x_y", "__", "C3-PO", "tab\there", "ÉCOLE"]
    return edge + fuzzed


def test_normalised_text_matches_the_regex_for_every_text():
    con = duck.connect()
    try:
        con.execute("CREATE TABLE texts (text VARCHAR)")
        con.executemany("INSERT INTO texts VALUES (?)", [[text] for text in texts_to_compare()])
        differing = con.execute(
            f"SELECT text, {normalised_text_sql('text')}, {REGEX} FROM texts "
            f"WHERE {normalised_text_sql('text')} IS DISTINCT FROM {REGEX}"
        ).fetchall()
        fast = con.execute(f"SELECT count({NORMALISE_ASCII_FUNCTION}(text)) FROM texts").fetchone()[0]
    finally:
        con.close()
    assert differing == []
    assert fast > 1000  # the ASCII texts took the fast path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello,   World!", "hello world"),
        ("  --lol--  ", "lol"),
        ("x_y", "x y"),
        ("", ""),
        ("!!!", ""),
        ("café", None),  # not ASCII: left to the regex
        (None, None),
    ],
)
def test_normalise_ascii(text, expected):
    assert normalise_ascii(pa.array([text], pa.string())).to_pylist() == [expected]


def test_normalise_ascii_on_a_sliced_chunked_array():
    texts = pa.chunked_array([["A b", None], ["  C--d ", "é", "E"]])
    assert normalise_ascii(texts).to_pylist() == ["a b", None, "c d", None, "e"]
    assert normalise_ascii(pa.array(["skip", "Keep It", "x"]).slice(1, 1)).to_pylist() == ["keep it"]


def test_python_normalises_as_sql_does():
    texts = [text for text in texts_to_compare() if text is not None] + TRICKY + every_character()
    in_sql = sql_values(normalised_text_sql("text"), texts)
    differing = [(text, sql, normalised_text(text)) for text, sql in zip(texts, in_sql, strict=True)]
    assert [row for row in differing if row[1] != row[2]] == []


def test_python_and_sql_word_sets_and_jaccard_agree():
    pairs = list(itertools.product(TRICKY, repeat=2))
    lefts, rights = [a for a, _ in pairs], [b for _, b in pairs]
    in_sql = sql_values(word_set_sql(normalised_text_sql("text")), lefts)
    assert [frozenset(words) for words in in_sql] == [word_set(text) for text in lefts]

    source = pa.table({"a": pa.array(lefts, pa.string()), "b": pa.array(rights, pa.string())})
    con = duck.connect()
    try:
        con.register("source", source)
        similarity = jaccard_sql(word_set_sql(normalised_text_sql("a")), word_set_sql(normalised_text_sql("b")))
        sql_similarity = [row[0] for row in con.execute(f"SELECT {similarity} FROM source").fetchall()]
    finally:
        con.close()
    python_similarity = [jaccard(word_set(a), word_set(b)) for a, b in pairs]
    assert sql_similarity == python_similarity  # the same divisions: equal, not just close


@pytest.mark.parametrize(
    ("a", "b", "similarity"),
    [
        ("a b c", "A, b; c!", 1.0),
        ("a b", "c d", 0.0),
        ("the cat sat", "The cat sat down", 0.75),
        ("lol", "LOL!!! lol", 1.0),
        ("", "", 1.0),  # two texts without words are alike
        ("", "words", 0.0),
        ("ΣΑΣ", "σασ", 1.0),  # lower case letter by letter, as DuckDB: no final sigma
    ],
)
def test_jaccard_of_word_sets(a, b, similarity):
    assert jaccard(word_set(a), word_set(b)) == similarity
