"""The fast normalised text gives exactly what the regex gives, and leaves non-ASCII to it."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from distill_pipeline.core import duck
from distill_pipeline.core.normalise import NORMALISE_ASCII_FUNCTION, normalise_ascii
from distill_pipeline.data.curation import normalised_text_sql

REGEX = "trim(regexp_replace(lower(text), '[^\\p{L}\\p{N}]+', ' ', 'g'))"


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
