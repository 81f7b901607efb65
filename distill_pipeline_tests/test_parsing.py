"""Tests for reading a label out of teacher responses: every real format, hostile inputs, other tasks."""

from __future__ import annotations

import math
import time

import pytest

from distill_pipeline.core.task import LabelSpec, load_task
from distill_pipeline.data.parsing import (
    MAX_STRUCTURED_CHARS,
    ParseMethod,
    ParseResult,
    _parse_general,
    parse_label,
    parse_responses,
)
from distill_pipeline_tests.conftest import JIGSAW_TEACHER_RESPONSES, requires_shared_jigsaw

TOXICITY = load_task("toxicity").label

# A task with three classes, a negative label value and a different key: nothing may assume 0/1.
SENTIMENT = LabelSpec(
    field="sentiment",
    values=(-1, 0, 1),
    names=("negative", "neutral", "positive"),
    positive=None,
    aliases={"-1": -1, "0": 0, "1": 1, "negative": -1, "neutral": 0, "positive": 1, "mixed": 0},
)


def ok(label: int, method: ParseMethod) -> ParseResult:
    return ParseResult(label, None, method)


def failed(error: str) -> ParseResult:
    return ParseResult(None, error, "none")


# --- the real teacher logs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_responses():
    import pandas as pd

    return pd.read_parquet(JIGSAW_TEACHER_RESPONSES, columns=["raw_response", "parsed_is_bad"])


@requires_shared_jigsaw
def test_parser_agrees_with_the_source_repository_parse_on_every_row(teacher_responses):
    assert len(teacher_responses) == 8170
    responses = teacher_responses["raw_response"].tolist()
    results = parse_responses(responses, TOXICITY)

    reference = teacher_responses["parsed_is_bad"]
    # The 49 sample.tiny rows have no reference parse (NaN).
    compared = [
        (result.label, int(expected))
        for result, expected in zip(results, reference, strict=True)
        if not math.isnan(expected)
    ]
    agreements = sum(ours == theirs for ours, theirs in compared)
    print(f"parser agrees with parsed_is_bad on {agreements} of {len(compared)} rows")
    assert len(compared) == 8121
    assert agreements == len(compared), f"only {agreements} of {len(compared)} rows agree"

    non_empty = [(text, result) for text, result in zip(responses, results, strict=True) if text and text.strip()]
    assert len(non_empty) == 8170
    unparsed = [(text[:80], result.error) for text, result in non_empty if result.label is None]
    assert unparsed == []
    assert {result.method for result in results} == {"json", "python_literal"}


@requires_shared_jigsaw
def test_cached_parse_matches_one_by_one_parse_on_real_data(teacher_responses):
    responses = teacher_responses["raw_response"].tolist()
    assert parse_responses(responses, TOXICITY) == [parse_label(text, TOXICITY) for text in responses]


@requires_shared_jigsaw
def test_canonical_fast_path_agrees_with_the_general_parser(teacher_responses):
    shapes = set(teacher_responses["raw_response"]) | {
        '{"is_bad": 2}',
        "{'is_bad': -0}",
        '```json\n{"is_bad": 01}\n```',
        '```\n{ "is_bad" : 1 }\n```',
        '{"is_bad": 1}```',
    }
    for text in shapes:
        assert parse_label(text, TOXICITY) == _parse_general(text.strip(), TOXICITY), text


# --- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ('```json\n{\n  "is_bad": 0\n}\n```', ok(0, "json")),
        ('```\n{"is_bad": 1}\n```', ok(1, "json")),
        ('```JSON\r\n{"is_bad": 1}\r\n```\n', ok(1, "json")),
        ('```json\n{"is_bad": 1}', ok(1, "json")),  # truncated: the closing fence never came
        (
            'The text uses no slurs, yet it promotes vandalism.\n\nDraft:\n```json\n{"is_bad": 0}\n```\n'
            'On reflection, here is the classification in JSON format:\n\n```json\n{\n  "is_bad": 1\n}\n```',
            ok(1, "json"),
        ),
        ('{"is_bad": 1}', ok(1, "json")),
        ('  {\n    "is_bad": 0\n}  \n', ok(0, "json")),
        ("{'is_bad': 0}", ok(0, "python_literal")),
        (
            "{'reason_innocent': 'It discusses a \"decline\" in sales.',\n 'reason_toxic': '',\n 'is_bad': 0}",
            ok(0, "python_literal"),
        ),
        (
            "{\n'reason_innocent': 'It questions another person\\'s version of events.',\n"
            "'reason_toxic': 'None',\n'is_bad': 1\n}",
            ok(1, "python_literal"),
        ),
    ],
    ids=[
        "fenced-json",
        "fenced-no-language",
        "fenced-uppercase-tag-crlf",
        "fenced-unclosed",
        "explanation-ending-in-fence-last-block-wins",
        "bare-json",
        "bare-json-padded",
        "python-dict",
        "cot-dict",
        "cot-dict-escaped-quote",
    ],
)
def test_structured_formats(response: str, expected: ParseResult):
    assert parse_label(response, TOXICITY) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            "{'reason_innocent': 'The user's edit summary is polite.',\n"
            " 'reason_toxic': 'It calls someone an 'idiot'.',\n 'is_bad': 1}",
            ok(1, "key_regex"),
        ),
        ("Verdict: 'is_bad': 0 (no insults)", ok(0, "key_regex")),
        ('{"is_bad":1, "reason": "unterminated', ok(1, "key_regex")),
        ("is_bad=1", ok(1, "key_regex")),
        ('is_bad: "1"', ok(1, "key_regex")),
        ("is_bad: 'toxic'", ok(1, "key_regex")),
        ("The answer is is_bad = False.", ok(0, "key_regex")),
        ('{"is_bad": 1', ok(1, "key_regex")),
    ],
    ids=[
        "cot-stray-quotes",
        "single-quoted-key-in-prose",
        "unterminated-json",
        "equals-sign",
        "quoted-value",
        "quoted-alias",
        "bare-false-with-full-stop",
        "invalid-json-missing-brace",
    ],
)
def test_key_regex_fallback(response: str, expected: ParseResult):
    assert parse_label(response, TOXICITY) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("true", 1),
        ("False", 0),
        ("1", 1),
        ("0\n", 0),
        ("toxic", 1),
        ("Toxic.", 1),
        ("  **Not   toxic**  ", 0),
        ("non-toxic", 0),
        ('"yes"', 1),
        ("```\nbad\n```", 1),
        ("+1", 1),
        ("[1]", 1),
    ],
)
def test_plain_answers_go_through_the_task_aliases(response: str, expected: int):
    assert parse_label(response, TOXICITY) == ok(expected, "plain")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ('{"is_bad": true}', ok(1, "json")),
        ('{"is_bad": false}', ok(0, "json")),
        ("{'is_bad': True}", ok(1, "python_literal")),
        ('{"is_bad": "1"}', ok(1, "json")),
        ('{"is_bad": " Toxic "}', ok(1, "json")),
        ('{"is_bad": 1.0}', ok(1, "json")),
    ],
)
def test_values_may_be_bool_int_float_or_text(response: str, expected: ParseResult):
    assert parse_label(response, TOXICITY) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (None, failed("no response")),
        ("", failed("empty response")),
        (" \n\t ", failed("empty response")),
        ('{"is_bad": "maybe"}', failed("value 'maybe' is not a label")),
        ('{"is_bad": 2}', failed("value 2 is not a label")),
        ('{"is_bad": 0.5}', failed("value 0.5 is not a label")),
        ('{"is_bad": null}', failed("value None is not a label")),
        ("{'is_bad': [1]}", failed("value [1] is not a label")),
        ('{"toxic": 1}', failed("no 'is_bad' key in JSON object")),
        ("{'toxic': 1}", failed("no 'is_bad' key in Python dict")),
        ('{"not_is_bad": 1}', failed("no 'is_bad' key in JSON object")),
        ("is_bad: maybe", failed("value 'maybe' is not a label")),
        ("maybe", failed("unrecognised format")),
        ("-1", failed("unrecognised format")),  # the sign is kept, so this is not read as 1
        ("not_is_bad: 1, is_bad_score: 0", failed("unrecognised format")),
        ('{"is_bad": }', failed("unrecognised format")),
        ("[1, 0]", failed("unrecognised format")),
        ("```json\n```", failed("unrecognised format")),
    ],
)
def test_failures_say_why(response: str | None, expected: ParseResult):
    assert parse_label(response, TOXICITY) == expected


def test_key_mentioned_twice_takes_the_last():
    assert parse_label('{"is_bad": 0, "is_bad": 1}', TOXICITY) == ok(1, "json")
    cot = "{'reason_toxic': 'At first I'd say is_bad: 0, but the slur decides it', 'is_bad': 1}"
    assert parse_label(cot, TOXICITY) == ok(1, "key_regex")
    assert parse_label("is_bad: 1 ... on reflection is_bad: 0", TOXICITY) == ok(0, "key_regex")


# --- hostile inputs ----------------------------------------------------------------------------


def test_ten_megabyte_responses_are_handled_quickly():
    ten_mb = 10 * 1024 * 1024
    started = time.perf_counter()
    assert parse_label("a" * ten_mb, TOXICITY) == failed("unrecognised format")
    assert parse_label("x" * ten_mb + ' "is_bad": 1', TOXICITY) == ok(1, "key_regex")
    # Too long for literal_eval, so the answer comes from the last key mention.
    padded = "{'is_bad': 0, 'pad': '" + "y" * ten_mb + "', 'is_bad': 1}"
    assert len(padded) > MAX_STRUCTURED_CHARS
    assert parse_label(padded, TOXICITY) == ok(1, "key_regex")
    assert parse_label("is_bad " * (ten_mb // 7), TOXICITY) == failed("unrecognised format")
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    "response",
    [
        "{" * 40_000 + "}" * 40_000,
        '{"a":' * 30_000 + "1" + "}" * 30_000,
        "{'a': " + "(" * 40_000 + "1" + ")" * 40_000 + "}",
        "{'a': " + "-" * 90_000 + "1}",
        "{'a': " + "not " * 20_000 + "1}",
        "{" * (MAX_STRUCTURED_CHARS * 5) + "}" * (MAX_STRUCTURED_CHARS * 5),
    ],
    ids=["braces", "json-objects", "parentheses", "unary-minus", "not-chain", "over-limit"],
)
def test_deep_nesting_is_refused_not_crashed(response: str):
    assert parse_label(response, TOXICITY) == failed("unrecognised format")


def test_deeply_nested_value_is_an_error_with_a_short_message():
    result = parse_label('{"is_bad": ' + "[" * 40_000 + "]" * 40_000 + "}", TOXICITY)
    assert result.label is None
    assert result.method == "none"
    # The key regex reads at most 64 characters of a value; the message shows fewer still.
    assert result.error == "value '" + "[" * 36 + "... is not a label"


def test_huge_value_is_shortened_in_the_error():
    result = parse_label('{"is_bad": "' + "z" * 5_000 + '"}', TOXICITY)
    assert result.error == "value '" + "z" * 36 + "... is not a label"


def test_code_in_a_response_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        "{'is_bad': __import__('pathlib').Path('pwned').touch()}": failed("value '__import__(' is not a label"),
        "{'is_bad': (lambda: open('pwned', 'w'))()}": failed("value '(lambda:' is not a label"),
        # The text after the key is read, never evaluated: "1" is what the answer says.
        "{'is_bad': 1 if open('pwned', 'w') else 0}": ok(1, "key_regex"),
    }
    assert {text: parse_label(text, TOXICITY) for text in cases} == cases
    assert list(tmp_path.iterdir()) == []


# --- many responses, other tasks ---------------------------------------------------------------


def test_parse_responses_parses_each_distinct_text_once():
    fenced = '```json\n{"is_bad": 1}\n```'
    responses = (text for text in [fenced, None, "", fenced, "toxic", None, fenced])
    results = parse_responses(responses, TOXICITY)
    assert results == [
        ok(1, "json"),
        failed("no response"),
        failed("empty response"),
        ok(1, "json"),
        ok(1, "plain"),
        failed("no response"),
        ok(1, "json"),
    ]
    assert results[0] is results[3] is results[6]
    assert parse_responses([], TOXICITY) == []


def test_a_three_class_task_uses_its_own_key_values_and_aliases():
    cases = {
        '```json\n{"sentiment": -1}\n```': ok(-1, "json"),
        "{'sentiment': 'Positive'}": ok(1, "python_literal"),
        "{'why': 'the user's tone is flat', 'sentiment': 0}": ok(0, "key_regex"),
        "sentiment=-1": ok(-1, "key_regex"),
        "Mixed.": ok(0, "plain"),
        "-1": ok(-1, "plain"),
        '{"sentiment": 2}': failed("value 2 is not a label"),
        # True is not read as 1 for a task whose aliases do not say what it means.
        '{"sentiment": true}': failed("value True is not a label"),
        '{"is_bad": 1}': failed("no 'sentiment' key in JSON object"),
        "toxic": failed("unrecognised format"),
    }
    assert {text: parse_label(text, SENTIMENT) for text in cases} == cases
    # ...and the toxicity task does not read sentiment answers.
    assert parse_label('{"sentiment": 1}', TOXICITY) == failed("no 'is_bad' key in JSON object")
