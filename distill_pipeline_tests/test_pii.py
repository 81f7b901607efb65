"""PII scrubbing: recall and false positives on a fixed set of realistic texts, and the DuckDB path.

``data/pii_cases.jsonl`` holds one text a line with the PII items it contains (kind and the exact
substring), or none: emails of many shapes, phone numbers of many countries and notations, card
numbers, IBANs, IP addresses, and texts full of ordinary numbers. ``pytest -s -k recall`` prints
the figures.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core import duck
from distill_pipeline.core.layout import raw_logs_prefix, teacher_labels_prefix
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import BUILTIN_TASKS_DIR, Task, load_task
from distill_pipeline.data.pii import KINDS, PLACEHOLDERS, scrub_parquet, scrub_table, scrub_text
from distill_pipeline.logs.schema import log_object_key
from distill_pipeline_tests.test_assets import _materialize, _metadata
from distill_pipeline_tests.test_ingest import DAY, ingest, jsonl, line

CASES = [json.loads(line) for line in (Path(__file__).parent / "data" / "pii_cases.jsonl").read_text().splitlines()]
MIN_RECALL = 0.95
MAX_FALSE_POSITIVE_RATE = 0.02


def leaks(text: str, value: str, scrubbed: str) -> bool:
    """Whether ``scrubbed`` still shows ``value`` or a piece of it (a token of four characters or
    more that the rest of ``text`` does not explain)."""
    if value in scrubbed:
        return True
    rest = text.replace(value, " ")
    return any(
        token in scrubbed and token not in rest for token in re.split(r"[^0-9A-Za-z]+", value) if len(token) >= 4
    )


def evaluate(scrub) -> dict:
    found = {kind: [0, 0] for kind in KINDS}
    missed, false_positives, clean = [], [], 0
    for case in CASES:
        scrubbed = scrub(case["text"])
        if not case["pii"]:
            clean += 1
            if scrubbed != case["text"]:
                false_positives.append((case["text"], scrubbed))
        for item in case["pii"]:
            found[item["kind"]][1] += 1
            if not leaks(case["text"], item["value"], scrubbed) and PLACEHOLDERS[item["kind"]] in scrubbed:
                found[item["kind"]][0] += 1
            else:
                missed.append((item["kind"], item["value"], scrubbed))
    items = sum(total for _, total in found.values())
    return {
        "recall": sum(hit for hit, _ in found.values()) / items,
        "by_kind": found,
        "items": items,
        "clean": clean,
        "false_positive_rate": len(false_positives) / clean,
        "missed": missed,
        "false_positives": false_positives,
    }


def test_the_cases_are_enough_and_well_formed():
    assert len(CASES) >= 200
    assert {item["kind"] for case in CASES for item in case["pii"]} == set(KINDS)
    assert sum(1 for case in CASES if not case["pii"]) >= 100
    for case in CASES:
        for item in case["pii"]:
            assert item["value"] in case["text"], case


def test_recall_and_false_positives_on_realistic_texts():
    result = evaluate(lambda text: scrub_text(text)[0])
    print(
        f"\nPII scrubbing on {len(CASES)} texts: recall {result['recall']:.1%} of {result['items']} items; "
        f"false positives {result['false_positive_rate']:.1%} of {result['clean']} PII-free texts"
    )
    for kind, (hit, total) in result["by_kind"].items():
        print(f"  {kind:6} {hit}/{total}")
    for kind, value, scrubbed in result["missed"]:
        print(f"  missed {kind}: {value!r} -> {scrubbed!r}")
    for text, scrubbed in result["false_positives"]:
        print(f"  false positive: {text!r} -> {scrubbed!r}")
    assert result["recall"] >= MIN_RECALL
    assert result["false_positive_rate"] <= MAX_FALSE_POSITIVE_RATE


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        ("", "", {}),
        ("no digits, no at-sign", "no digits, no at-sign", {}),
        ("a@b.co and c@d.co", "<EMAIL> and <EMAIL>", {"email": 2}),
        # The card is not read as a phone number, the IBAN's digits not as a card.
        ("4111 1111 1111 1111", "<CARD>", {"card": 1}),
        ("DE89 3704 0044 0532 0130 00 then", "<IBAN> then", {"iban": 1}),
        # A card with its CVV after it: the card is the run of groups that validates.
        ("4111 1111 1111 1111 123", "<CARD> 123", {"card": 1}),
        ("::ffff:192.0.2.128 and 10.0.0.1:8080", "<IP> and <IP>:8080", {"ip": 2}),
        ("999.1.1.1 and 01.2.3.4 and 1.2.3", "999.1.1.1 and 01.2.3.4 and 1.2.3", {}),
        ("ratio 16:9 :: 12:30:45 std::map", "ratio 16:9 :: 12:30:45 std::map", {}),
        ("call +44 20 7946 0958.", "call <PHONE>.", {"phone": 1}),
        # Placeholders already in a text are left as they are, and a second pass changes nothing.
        ("<EMAIL> <PHONE> 2024", "<EMAIL> <PHONE> 2024", {}),
    ],
)
def test_scrub_text(text, expected, counts):
    scrubbed, found = scrub_text(text)
    assert scrubbed == expected
    assert found == {kind: counts.get(kind, 0) for kind in KINDS}
    assert scrub_text(scrubbed)[0] == scrubbed


def test_hostile_texts_stay_cheap_and_whole():
    # Long runs that the candidate patterns could backtrack on, and text in other scripts.
    texts = ["a" * 100_000 + "@", "1" * 10_000, "1-" * 5_000, ":" * 10_000, "DE89" + "0" * 5_000, "ü@ü.ü ☃ \x00 +"]
    for text in texts:
        scrubbed, _ = scrub_text(text)
        assert isinstance(scrubbed, str)


def test_scrub_table_rewrites_only_the_chosen_rows_and_counts(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [1, 2, 3, 4, 5],
                "keep": [True, True, True, False, True],
                "input": ["mail a@b.co now", "call +1 617-253-1000", None, "x@y.io", "nothing here 42"],
                "response": ['{"toxic": true}', "ok", "ip 8.8.8.8", None, "a@b.co"],
            }
        ),
        path,
    )
    con = duck.connect(tmp_path / "duckdb")
    con.execute(f"CREATE TABLE t AS SELECT * FROM read_parquet('{path}')")
    counts = scrub_table(con, "t", {"input": "keep", "response": "keep"})
    rows = con.execute("SELECT input, response FROM t ORDER BY id").fetchall()
    assert rows == [
        ("mail <EMAIL> now", '{"toxic": true}'),
        ("call <PHONE>", "ok"),
        (None, "ip <IP>"),
        ("x@y.io", None),  # not chosen: left as it was
        ("nothing here 42", "<EMAIL>"),
    ]
    assert counts == {"email": 2, "iban": 0, "card": 0, "ip": 1, "phone": 1}
    # A second call on the same connection finds the function registered, and nothing left.
    assert scrub_table(con, "t", {"input": "keep", "response": "keep"}) == dict.fromkeys(KINDS, 0)
    con.close()


def test_scrub_parquet_keeps_rows_order_and_types(tmp_path):
    path = tmp_path / "records.parquet"
    table = pa.table({"id": [3, 1, 2], "input": ["a@b.co", None, "plain"], "score": [0.5, 1.5, 2.5]})
    pq.write_table(table, path)
    assert scrub_parquet(path, ["input"], tmp_path / "duckdb") == {**dict.fromkeys(KINDS, 0), "email": 1}
    assert pq.read_table(path).to_pylist() == [
        {"id": 3, "input": "<EMAIL>", "score": 0.5},
        {"id": 1, "input": None, "score": 1.5},
        {"id": 2, "input": "plain", "score": 2.5},
    ]


# A record whose input and response carry PII, a clean one, a duplicate of the first (its excerpt
# names where the first was seen) and a line that is not JSON (its excerpt quotes it).
PII_LINES = [
    line("r1", input="mail me at jane.doe@example.com", response='{"is_bad": 0} (they wrote +44 20 7946 0958)'),
    line("r2", input="nothing personal, order 2024-00815"),
    line("r1", input="again jane.doe@example.com"),
    '{"broken": "card 4111 1111 1111 1111',
]


def test_ingest_scrubs_records_and_quarantined_lines_when_asked(local_store: LocalStore, tmp_path: Path) -> None:
    local_store.put_bytes("logs/a.jsonl", jsonl(*PII_LINES))
    stats, kept, quarantined = ingest(local_store, tmp_path, ["logs/a.jsonl"], scrub_pii=True)
    assert [(r["input"], r["response"]) for r in kept] == [
        ("mail me at <EMAIL>", '{"is_bad": 0} (they wrote <PHONE>)'),
        ("nothing personal, order 2024-00815", '```json\n{"is_bad": 0}\n```'),
    ]
    assert {r["reason"]: r["excerpt"] for r in quarantined} == {
        "duplicate request_id": "first seen at logs/a.jsonl:1",
        "not valid JSON": '{"broken": "card <CARD>',
    }
    assert stats.pii_scrubbed == {"email": 1, "iban": 0, "card": 1, "ip": 0, "phone": 1}

    stats, kept, quarantined = ingest(local_store, tmp_path, ["logs/a.jsonl"], name="off")
    assert kept[0]["input"] == "mail me at jane.doe@example.com"
    assert stats.pii_scrubbed == {}


def _task(tmp_path: Path, name: str, *, scrub_pii: bool) -> Task:
    folder = tmp_path / name
    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    toml = folder / "task.toml"
    toml.write_text(toml.read_text().replace("scrub_pii = false", f"scrub_pii = {str(scrub_pii).lower()}"))
    return load_task(folder)


def _inputs(store: LocalStore, key: str, tmp_path: Path) -> list[str]:
    local = tmp_path / key.replace("/", "_")
    store.get_file(key, local)
    return pq.read_table(local, columns=["input"]).column(0).to_pylist()


def test_raw_logs_and_teacher_labels_keep_no_pii_when_the_task_scrubs(local_store: LocalStore, tmp_path: Path) -> None:
    # Without the line that is not JSON: one bad line in three would fail the quarantine check.
    local_store.put_bytes(log_object_key(DAY, "a.jsonl"), jsonl(*PII_LINES[:3]))
    scrubbing = _task(tmp_path, "scrubbing", scrub_pii=True)
    with dg.instance_for_test() as instance:
        raw = _metadata(_materialize("raw_logs", local_store, scrubbing, instance, DAY), "raw_logs")
        assert raw["pii_scrubbed"] == {"email": 1, "iban": 0, "card": 0, "ip": 0, "phone": 1}
        assert _inputs(local_store, raw_logs_prefix(DAY) + "records.parquet", tmp_path) == [
            "mail me at <EMAIL>",
            "nothing personal, order 2024-00815",
        ]
        # raw_logs scrubbed the day: teacher_labels has nothing left to do.
        labels = _metadata(_materialize("teacher_labels", local_store, scrubbing, instance, DAY), "teacher_labels")
        assert labels["pii_scrubbed"] == {}
        assert _inputs(local_store, teacher_labels_prefix(DAY) + "labels.parquet", tmp_path)[0] == "mail me at <EMAIL>"

        # A day ingested before scrubbing was switched on is scrubbed by teacher_labels itself.
        not_scrubbing = _task(tmp_path, "not-scrubbing", scrub_pii=False)
        raw = _metadata(_materialize("raw_logs", local_store, not_scrubbing, instance, DAY), "raw_logs")
        assert raw["pii_scrubbed"] == {}
        labels = _metadata(_materialize("teacher_labels", local_store, scrubbing, instance, DAY), "teacher_labels")
        assert labels["pii_scrubbed"] == {"email": 1, "iban": 0, "card": 0, "ip": 0, "phone": 1}
        assert _inputs(local_store, teacher_labels_prefix(DAY) + "labels.parquet", tmp_path / "again")[0] == (
            "mail me at <EMAIL>"
        )
