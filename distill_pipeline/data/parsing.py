"""Reading a task's label out of a raw teacher response.

Teachers answer in many shapes: a fenced ```json block, a bare JSON object, a Python dict with
single quotes, a chain-of-thought dict whose free-text reasons break every parser, or a plain word.
What counts as the answer is the task's :class:`~distill_pipeline.core.task.LabelSpec` (its key, label
values and plain-text aliases); nothing here knows which task it serves.

The order of attempts is the order of trust: a structured object first, then the last mention of
the label key, then the whole answer as one word. A value outside the label set is an error, never
rounded to the nearest label.
"""

from __future__ import annotations

import ast
import json
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from distill_pipeline.core.task import LabelSpec

ParseMethod = Literal["json", "python_literal", "key_regex", "plain", "none"]

# literal_eval builds a full AST before it rejects anything, so a hostile answer could cost
# memory and time in proportion to its size; no real label object comes near this length.
MAX_STRUCTURED_CHARS = 100_000
# A plain answer is a word or two; anything longer is prose, and normalising megabytes of prose
# to look it up as one word would be wasted work.
MAX_PLAIN_CHARS = 200
# Error texts end up in metadata tables read by people: keep a hostile value from flooding them.
_MAX_ERROR_VALUE_CHARS = 40

# The opening fence may carry a language tag only when a newline follows it, so that a one-line
# "```toxic```" keeps its word. An unclosed fence (a truncated answer) runs to the end.
_FENCED_BLOCK = re.compile(r"```(?:[\w+.-]*[ \t]*\r?\n)?(.*?)(?:```|\Z)", re.DOTALL)
# Keep a sign that belongs to a number ("-1" is a label in some tasks), drop other decoration.
_EDGE_DECORATION = re.compile(r"^(?:(?![+-]\d)[\W_])+|[\W_]+$")
_INTEGER_TEXT = re.compile(r"[+-]?\d{1,18}(?:\.0*)?")


@dataclass(frozen=True, slots=True)
class ParseResult:
    """A parsed label, or why there is none; ``method`` is ``"none"`` exactly when ``label`` is."""

    label: int | None
    error: str | None
    method: ParseMethod


_NO_RESPONSE = ParseResult(None, "no response", "none")
_EMPTY_RESPONSE = ParseResult(None, "empty response", "none")
_UNRECOGNISED = ParseResult(None, "unrecognised format", "none")


def parse_label(response: str | None, label: LabelSpec) -> ParseResult:
    """Parse one teacher response into one of ``label.values``, or say why it cannot be."""
    if response is None:
        return _NO_RESPONSE
    text = response.strip()
    if not text:
        return _EMPTY_RESPONSE
    # Nearly every production answer is exactly {"<field>": <int>}, fenced or not; one anchored
    # regex settles those without json, ast or the fallbacks below.
    canonical = _canonical_answer(label.field).fullmatch(text)
    if canonical is not None:
        value = int(canonical["value"])
        if value in label.values:
            return ParseResult(value, None, "json" if canonical["quote"] == '"' else "python_literal")
    return _parse_general(text, label)


def parse_responses(responses: Iterable[str | None], label: LabelSpec) -> list[ParseResult]:
    """Parse many; each distinct response text is parsed once (responses repeat heavily)."""
    return list(map(_ParseMemo(label).__getitem__, responses))


class _ParseMemo(dict[str | None, ParseResult]):
    # A dict subclass with __missing__ keeps the hit path (almost every row) inside C.
    def __init__(self, label: LabelSpec) -> None:
        super().__init__()
        self.label = label

    def __missing__(self, response: str | None) -> ParseResult:
        result = self[response] = parse_label(response, self.label)
        return result


def _parse_general(text: str, label: LabelSpec) -> ParseResult:
    # Explanations that end with the answer in a fence are common, so the last fenced block wins.
    body = _last_fenced_block(text) or text
    structured = _load_object(body)
    if structured is not None:
        obj, method, kind = structured
        if label.field not in obj:
            return ParseResult(None, f"no {label.field!r} key in {kind}", "none")
        return _as_label(obj[label.field], label, method)
    # A dict whose reasons hold unescaped quotes parses as nothing, yet still ends with the key.
    for candidate in dict.fromkeys((body, text)):
        mentioned = _last_key_value(candidate, label.field)
        if mentioned is not None:
            return _as_label(mentioned, label, "key_regex")
    if len(body) <= MAX_PLAIN_CHARS:
        value = _alias_value(body, label)
        if value is not None:
            return ParseResult(value, None, "plain")
    return _UNRECOGNISED


def _last_fenced_block(text: str) -> str | None:
    if "```" not in text:
        return None
    blocks = [block.strip() for block in _FENCED_BLOCK.findall(text)]
    return next((block for block in reversed(blocks) if block), None)


def _load_object(body: str) -> tuple[dict[Any, Any], ParseMethod, str] | None:
    # Only an object can hold the label key; anything else is left to the fallbacks.
    if not (body.startswith("{") and body.endswith("}")) or len(body) > MAX_STRUCTURED_CHARS:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        pass
    else:
        return (obj, "json", "JSON object") if isinstance(obj, dict) else None
    try:
        # literal_eval evaluates literals only, never names or calls; the errors are how it
        # refuses deep nesting (parser limits surface as MemoryError or RecursionError).
        obj = ast.literal_eval(body)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None
    return (obj, "python_literal", "Python dict") if isinstance(obj, dict) else None


def _last_key_value(text: str, field: str) -> str | None:
    if field not in text:
        return None
    # The last mention is the answer: earlier ones tend to sit inside the reasoning.
    last = deque(_key_value_pattern(field).finditer(text), maxlen=1)
    if not last:
        return None
    return next(group for group in last[0].groups()[1:] if group is not None)


def _as_label(value: object, label: LabelSpec, method: ParseMethod) -> ParseResult:
    parsed: int | None
    if isinstance(value, bool):
        # True means whatever the task's aliases say it means; 1 is only a guess for tasks
        # whose labels are not 0/1.
        parsed = label.aliases.get(str(value).lower())
    elif isinstance(value, int):
        parsed = value if value in label.values else None
    elif isinstance(value, float) and value.is_integer():
        parsed = int(value) if int(value) in label.values else None
    elif isinstance(value, str) and len(value) <= MAX_PLAIN_CHARS:
        parsed = _alias_value(value, label)
    else:
        parsed = None
    if parsed is None:
        shown = repr(value)
        if len(shown) > _MAX_ERROR_VALUE_CHARS:
            shown = shown[: _MAX_ERROR_VALUE_CHARS - 3] + "..."
        return ParseResult(None, f"value {shown} is not a label", "none")
    return ParseResult(parsed, None, method)


def _alias_value(text: str, label: LabelSpec) -> int | None:
    # Aliases are stored lower-cased and stripped (task.py); inner punctuation such as the hyphen
    # of "non-toxic" is part of the alias, so only the edges are cleaned.
    spaced = " ".join(text.lower().split())
    if spaced in label.aliases:
        return label.aliases[spaced]
    bare = _EDGE_DECORATION.sub("", spaced)
    if bare in label.aliases:
        return label.aliases[bare]
    if _INTEGER_TEXT.fullmatch(bare):
        number = int(bare.partition(".")[0])
        return number if number in label.values else None
    return None


@lru_cache(maxsize=64)
def _canonical_answer(field: str) -> re.Pattern[str]:
    # Must accept only answers that _parse_general reads the same way (tested); leading zeros
    # are excluded because JSON rejects them.
    key = re.escape(field)
    return re.compile(
        r"(?P<fence>```(?:json)?[ \t]*\r?\n)?\s*"
        rf"\{{\s*(?P<quote>[\"']){key}(?P=quote)\s*:\s*(?P<value>-?(?:0|[1-9]\d{{0,17}}))\s*\}}"
        r"\s*(?(fence)```)"
    )


@lru_cache(maxsize=64)
def _key_value_pattern(field: str) -> re.Pattern[str]:
    # Covers 'k': 1, "k":1, k=1, k: "1" and bare k: true; the value is a quoted string or one
    # token, capped in length so a runaway value cannot make a match expensive.
    key = re.escape(field)
    return re.compile(
        rf"(?<!\w)([\"']?){key}\1\s*[:=]\s*"
        r"(?:\"([^\"\n]{0,64})\"|'([^'\n]{0,64})'|([^\s,;}\])\"']{1,64}))"
    )
