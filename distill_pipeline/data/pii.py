"""Personal data in free text, found by validating it, and replaced by typed placeholders.

``scrub_text`` turns a text into its scrubbed form and the number of items of each kind it
replaced. ``scrub_table`` does the same to text columns of a DuckDB table in place, through a
Python function registered on the connection that takes Arrow batches, and ``scrub_parquet`` to
a Parquet file. Each kind is found by a cheap candidate pattern and then confirmed by a library
that knows the format, so ordinary numbers (invoices, ISBNs, dates, versions) are left alone:

- ``<EMAIL>``: the WHATWG HTML "valid e-mail address" grammar (what browsers check), with
  Unicode letters allowed in the local part (RFC 6531) and a dotted domain required;
- ``<IBAN>``: ``stdnum.iban`` (the country's length and format, ISO 7064 mod 97-10);
- ``<CARD>``: ``stdnum.luhn`` on 13 to 19 digits whose prefix and length belong to a card scheme;
- ``<IP>``: the standard library's ``ipaddress`` (IPv4 without leading zeros; IPv6 in every
  notation, with a zone);
- ``<PHONE>``: ``phonenumbers`` (libphonenumber's metadata) with leniency VALID, in international
  notation from anywhere and in the national notation of ``PHONE_REGIONS``, when written the way
  phone numbers are (see ``_written_as_phone``), and not an id in a link or a cited ISBN.

Kinds are searched in that order, each in the text the previous ones left: an address, an
account or a card number is never taken apart as a phone number, and placeholders hold no
digit for a later pass to find. Texts with neither a digit nor an "@" hold none of these kinds
and cost one regex search (in SQL, before the function is called).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import duckdb
import duckdb.sqltypes
import phonenumbers
import pyarrow as pa
from stdnum import iban, isbn, luhn

from distill_pipeline.core import duck

PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "iban": "<IBAN>",
    "card": "<CARD>",
    "ip": "<IP>",
    "phone": "<PHONE>",
}
KINDS: tuple[str, ...] = tuple(PLACEHOLDERS)

#: National notations recognised (international ones, "+" or "00", are from any country). Each
#: region is one more pass of the phone matcher over a text that still has a long run of digits.
PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "ES", "IT", "AU", "CN")

#: libphonenumber's own guard for degenerate texts: a pass gives up after this many candidates
#: that are not phone numbers (a table of figures, not a comment), so no text costs more than a
#: few milliseconds per region.
PHONE_MAX_TRIES = 200

#: The name of the scrubbing function on a connection (see ``register``).
SCRUB_FUNCTION = "distill_scrub_pii"

# The SQL and Python form of the pre-filter: every kind holds a digit or an "@" (an IPv6 address
# without a single digit, all of its groups letters a-f, is not worth a pass over every text).
_MAY_HOLD_PII_SQL = "[0-9@]"
_MAY_HOLD_PII = re.compile(_MAY_HOLD_PII_SQL)

# WHATWG's local part, Unicode letters and digits added; at most 64 characters (RFC 5321), which
# also bounds the work a long word before an "@" costs. The top-level label is ASCII letters (or
# an IDNA label) so that a script without spaces after the address is not taken into it.
_EMAIL = re.compile(
    r"[\w.!#$%&'*+/=?^`{|}~-]{1,64}@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})"
    r"(?![A-Za-z0-9-])"
)
# An IBAN is a country code and two check digits, then up to 30 letters and digits, written in
# one piece or in groups; the candidate runs to the last group that could belong to it, and the
# longest prefix ending at a group boundary that validates is the IBAN.
_IBAN_CANDIDATE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){8,32}")
# Digits in groups joined by one space or dash: a card is a run of whole groups within it.
_DIGIT_GROUPS = re.compile(r"(?<![\d.,])\d+(?:[ -]\d+)*(?![\d]|[.,]\d)")
_GROUP_SEPARATOR = re.compile(r"[ -]")
# Not inside a longer dotted number; after a word and a full stop it may be ("lovers.10.0.0.1").
_IPV4_CANDIDATE = re.compile(r"(?<!\w)(?<!\d\.)(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d|\w)")
_IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%[\w.-]+)?(?![\w:])"
)
#: Digits a phone number has at least, as written (with the area code or country code): fewer is a
#: short code or an extension, which some countries' plans allow but which say nothing about a person.
PHONE_MIN_DIGITS = 7
# A run of that many digits that only separators interrupt: a text without one is spared the matcher.
_PHONE_GATE = re.compile(rf"\d(?:[\s().\-/]{{0,3}}\d){{{PHONE_MIN_DIGITS - 1},}}")

# An international prefix, or an area code in parentheses, at the start of a phone number.
_PHONE_PREFIX = re.compile(r"\+|00|\(\d{1,5}\)")
# A link with a scheme or a host name and a path; it starts where a word does, so that a long word
# is scanned once, not once from each of its characters.
_LINK = re.compile(
    r"(?<![\w+.-])(?:[A-Za-z][A-Za-z0-9+.-]*://|www\.)\S+|(?<![\w.-])[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}/\S*"
)
_ISBN_LABEL = re.compile(r"ISBN(?:-1[03])?:?\s*$", re.IGNORECASE)

# Card schemes by issuer prefix (IIN) and the lengths they issue, from the schemes' published
# ranges: python-stdnum checks the Luhn digit but has no table of schemes, and Luhn alone lets
# one in ten long numbers through. Visa's 13-digit cards are no longer issued (an EAN-13 barcode
# would pass for one).
_CARD_SCHEMES: tuple[tuple[str, str, frozenset[int]], ...] = (
    ("4", "4", frozenset({16, 19})),  # Visa
    ("51", "55", frozenset({16})),  # Mastercard
    ("2221", "2720", frozenset({16})),  # Mastercard 2-series
    ("2200", "2204", frozenset(range(16, 20))),  # Mir
    ("34", "34", frozenset({15})),  # American Express
    ("37", "37", frozenset({15})),
    ("300", "305", frozenset(range(14, 20))),  # Diners Club
    ("36", "36", frozenset(range(14, 20))),
    ("38", "39", frozenset(range(16, 20))),
    ("3528", "3589", frozenset(range(16, 20))),  # JCB
    ("50", "50", frozenset(range(13, 20))),  # Maestro
    ("56", "69", frozenset(range(13, 20))),  # Maestro, Discover, UnionPay, RuPay
)


def _is_card_number(digits: str) -> bool:
    if not 13 <= len(digits) <= 19:
        return False
    scheme = any(low <= digits[: len(low)] <= high and len(digits) in lengths for low, high, lengths in _CARD_SCHEMES)
    return scheme and luhn.is_valid(digits)


def _card_span(run: str) -> tuple[int, int] | None:
    """The span in ``run`` (digit groups) of the first, then longest, run of whole groups that is
    a card number."""
    groups = [(m.start(), m.end()) for m in re.finditer(r"\d+", run)]
    for first, (start, _) in enumerate(groups):
        found, digits = None, ""
        for group_start, group_end in groups[first:]:
            digits += run[group_start:group_end]
            if len(digits) > 19:
                break
            if _is_card_number(digits):
                found = (start, group_end)
        if found is not None:
            return found
    return None


def _iban_span(candidate: str) -> int | None:
    """The length of the longest prefix of ``candidate`` ending at a group boundary that is an IBAN."""
    ends = [m.start() for m in _GROUP_SEPARATOR.finditer(candidate)] + [len(candidate)]
    for end in reversed(ends):
        if iban.is_valid(candidate[:end]):
            return end
    return None


def _is_ip(candidate: str) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    # "::" (and 0.0.0.0) is no one's address, and "a :: b" is notation.
    return not address.is_unspecified


Span = tuple[int, int]


def _replace(text: str, spans: Iterable[Span], placeholder: str) -> str:
    pieces, last = [], 0
    for start, end in spans:
        pieces += [text[last:start], placeholder]
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


def _emails(text: str) -> list[Span]:
    return [m.span() for m in _EMAIL.finditer(text)] if "@" in text else []


def _ibans(text: str) -> list[Span]:
    spans = []
    for match in _IBAN_CANDIDATE.finditer(text):
        length = _iban_span(match.group())
        if length is not None:
            spans.append((match.start(), match.start() + length))
    return spans


def _cards(text: str) -> list[Span]:
    spans = []
    for match in _DIGIT_GROUPS.finditer(text):
        if sum(c.isdigit() for c in match.group()) >= 13:
            found = _card_span(match.group())
            if found is not None:
                spans.append((match.start() + found[0], match.start() + found[1]))
    return spans


def _ips(text: str) -> list[Span]:
    found = []
    if "." in text:
        found += [m.span() for m in _IPV4_CANDIDATE.finditer(text) if _is_ip(m.group())]
    if text.count(":") >= 2:
        found += [m.span() for m in _IPV6_CANDIDATE.finditer(text) if _is_ip(m.group())]
    # An IPv4 address in an IPv6 one (::ffff:192.0.2.1) is found twice: the outer one stays.
    found.sort(key=lambda span: (span[0], -span[1]))
    spans: list[Span] = []
    for span in found:
        if not spans or span[0] >= spans[-1][1]:
            spans.append(span)
    return spans


def _phones(text: str, region: str) -> list[Span]:
    matches = [
        m
        for m in phonenumbers.PhoneNumberMatcher(
            text, region, leniency=phonenumbers.Leniency.VALID, max_tries=PHONE_MAX_TRIES
        )
        if sum(c.isdigit() for c in m.raw_string) >= PHONE_MIN_DIGITS and _written_as_phone(m.raw_string, region)
    ]
    if not matches:
        return []
    # The ids in links (page revisions, product and photo ids) have a phone number's length.
    links = [m.span() for m in _LINK.finditer(text)]
    return [
        (m.start, m.end)
        for m in matches
        if not any(start <= m.start < end for start, end in links) and not _is_cited_isbn(text, m.start, m.raw_string)
    ]


def _written_as_phone(raw: str, region: str) -> bool:
    """Whether a valid number is written the way phone numbers are: after an international
    prefix or with its area code in parentheses, or else in the groups its country uses.

    Leniency VALID alone takes dotted dates (03.02.2024), hyphenated ISBNs and version numbers for
    national numbers; STRICT_GROUPING alone misses common international spellings ("+33 612 345
    678", Brazil's "(11) 9 1234-5678").
    """
    if _PHONE_PREFIX.match(raw):
        return True
    strict = phonenumbers.PhoneNumberMatcher(raw, region, leniency=phonenumbers.Leniency.STRICT_GROUPING)
    return strict.has_next()


def _is_cited_isbn(text: str, start: int, raw: str) -> bool:
    """A number after the word ISBN that is one (books are cited that way in comments)."""
    return bool(_ISBN_LABEL.search(text, max(0, start - 16), start)) and isbn.is_valid(raw)


_FINDERS: tuple[tuple[str, Callable[[str], list[Span]]], ...] = (
    ("email", _emails),
    ("iban", _ibans),
    ("card", _cards),
    ("ip", _ips),
)


def scrub_text(text: str, regions: Iterable[str] = PHONE_REGIONS) -> tuple[str, dict[str, int]]:
    """``text`` with every email, IBAN, card number, IP address and phone number replaced by its
    kind's placeholder, and how many of each kind were replaced."""
    counts = dict.fromkeys(KINDS, 0)
    if not _MAY_HOLD_PII.search(text):
        return text, counts
    for kind, find in _FINDERS:
        spans = find(text)
        if spans:
            text = _replace(text, spans, PLACEHOLDERS[kind])
            counts[kind] = len(spans)
    for region in regions:
        if not _PHONE_GATE.search(text):
            break
        spans = _phones(text, region)
        if spans:
            text = _replace(text, spans, PLACEHOLDERS["phone"])
            counts["phone"] += len(spans)
    return text, counts


_RESULT_TYPE = pa.struct([("text", pa.string()), *((kind, pa.int32()) for kind in KINDS)])


def scrub_arrow(texts: pa.Array | pa.ChunkedArray) -> pa.StructArray:
    """``scrub_text`` over an Arrow string array: a struct of the text and the count of each kind."""
    results = [scrub_text(text) if text is not None else (None, dict.fromkeys(KINDS, 0)) for text in texts.to_pylist()]
    return pa.array(
        [{"text": text, **counts} for text, counts in results],
        type=_RESULT_TYPE,
    )


def register(con: duckdb.DuckDBPyConnection) -> None:
    """Make ``SCRUB_FUNCTION`` callable in ``con``'s SQL (once per connection)."""
    registered = con.execute("SELECT 1 FROM duckdb_functions() WHERE function_name = ?", [SCRUB_FUNCTION]).fetchall()
    if registered:
        return
    con.create_function(
        SCRUB_FUNCTION,
        scrub_arrow,
        [duckdb.sqltypes.VARCHAR],
        duckdb.struct_type({"text": "VARCHAR", **dict.fromkeys(KINDS, "INTEGER")}),
        type="arrow",
        side_effects=False,
    )


def scrub_table(con: duckdb.DuckDBPyConnection, table: str, columns: Mapping[str, str]) -> dict[str, int]:
    """Scrub text columns of ``table`` in place: ``columns`` maps each column to the SQL condition
    of the rows to scrub in it. Returns the items replaced, by kind, over all columns."""
    register(con)
    totals: Counter[str] = Counter(dict.fromkeys(KINDS, 0))
    for column, condition in columns.items():
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE pii_scrubbed AS
            SELECT row_id, unnest(scrubbed) FROM (
                SELECT rowid AS row_id, {SCRUB_FUNCTION}({column}) AS scrubbed FROM {table}
                WHERE ({condition}) AND regexp_matches({column}, '{_MAY_HOLD_PII_SQL}')
            )
            """
        )
        sums = con.execute(f"SELECT {', '.join(f'coalesce(sum({kind}), 0)' for kind in KINDS)} FROM pii_scrubbed")
        totals.update(dict(zip(KINDS, sums.fetchall()[0], strict=True)))
        con.execute(
            f"UPDATE {table} SET {column} = p.text FROM pii_scrubbed p "
            f"WHERE {table}.rowid = p.row_id AND {' + '.join(f'p.{kind}' for kind in KINDS)} > 0; "
            "DROP TABLE pii_scrubbed"
        )
    return {kind: int(totals[kind]) for kind in KINDS}


def scrub_parquet(path: Path, columns: Sequence[str], workdir: Path) -> dict[str, int]:
    """Scrub text ``columns`` of the Parquet table at ``path`` in place, rows and their order kept.
    Returns the items replaced, by kind."""
    con = duck.connect(workdir)
    rewritten = path.with_name(path.name + ".scrubbed")
    try:
        con.execute(f"CREATE TABLE scrubbed AS SELECT * FROM read_parquet({duck.sql_string(str(path))})")
        counts = scrub_table(con, "scrubbed", dict.fromkeys(columns, "TRUE"))
        if any(counts.values()):
            duck.copy_to_parquet(con, "SELECT * FROM scrubbed", rewritten)
    finally:
        con.close()
    if any(counts.values()):
        rewritten.replace(path)
    return counts
