"""PII scrubbing: the library-backed scrubber against the hand regexes it replaced, in one run.

Quality on the case set the tests keep (``distill_pipeline_tests/data/pii_cases.jsonl``): recall
of PII items and the share of PII-free texts changed, each with a 95% Wilson interval, scored by
the tests' own ``evaluate``. Speed on Jigsaw comments (``jigsaw/train.parquet`` under
``$DISTILL_SHARED_DATA``, repeated to ``--rows``) through DuckDB, as curation and ingestion run it:
``pii.scrub_table`` against the previous implementation's pass (three ``regexp_replace``
patterns, kept below as the baseline), the ratio measured in the same process.

    python bench/bench_pii.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from distill_pipeline.core import duck
from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.data import pii
from distill_pipeline_tests.conftest import SHARED_JIGSAW
from distill_pipeline_tests.test_pii import evaluate

#: The previous scrubber (hand regexes, applied in order by DuckDB), the baseline of this benchmark.
REGEX_BASELINE = {
    "email": (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", "<EMAIL>"),
    "card": (r"\b(?:\d[ -]?){12,18}\d\b", "<CARD>"),
    "phone": (r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\b\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}\b", "<PHONE>"),
}


def wilson(hits: int, n: int) -> tuple[float, float]:
    z = 1.959964
    centre = (hits + z * z / 2) / (n + z * z)
    half = z * math.sqrt(hits * (n - hits) / n + z * z / 4) / (n + z * z)
    return centre - half, centre + half


def regex_pass(con: duckdb.DuckDBPyConnection, table: str) -> None:
    for pattern, placeholder in REGEX_BASELINE.values():
        quoted = duck.sql_string(pattern)
        con.execute(
            f"UPDATE {table} SET input = regexp_replace(input, {quoted}, {duck.sql_string(placeholder)}, 'g') "
            f"WHERE regexp_matches(input, {quoted})"
        )


def quality_rows() -> list[tuple[str, ...]]:
    con = duckdb.connect()

    def baseline(text: str) -> str:
        for pattern, placeholder in REGEX_BASELINE.values():
            text = con.execute("SELECT regexp_replace(?, ?, ?, 'g')", [text, pattern, placeholder]).fetchone()[0]
        return text

    rows = []
    for name, scrub in (("pii.scrub_text", lambda text: pii.scrub_text(text)[0]), ("regex baseline", baseline)):
        result = evaluate(scrub)
        hits, items = round(result["recall"] * result["items"]), result["items"]
        changed, clean = len(result["false_positives"]), result["clean"]
        low, high = wilson(hits, items)
        fp_low, fp_high = wilson(changed, clean)
        rows.append(
            (
                name,
                f"{hits}/{items} = {hits / items:.1%} [{low:.1%}, {high:.1%}]",
                f"{changed}/{clean} = {changed / clean:.1%} [{fp_low:.1%}, {fp_high:.1%}]",
            )
        )
    con.close()
    return rows


def speed_rows(rows: int) -> list[tuple[str, ...]]:
    texts = pq.read_table(SHARED_JIGSAW / "train.parquet", columns=["comment_text"]).column(0).to_pylist()
    with tempfile.TemporaryDirectory(prefix="bench-pii-") as directory:
        path = Path(directory) / "comments.parquet"
        pq.write_table(pa.table({"input": [texts[i % len(texts)] for i in range(rows)]}), path)
        seconds = {}
        for name, run in (
            ("pii.scrub_table", lambda con: pii.scrub_table(con, "t", {"input": "TRUE"})),
            ("regex baseline", lambda con: regex_pass(con, "t")),
        ):
            con = duck.connect()
            con.execute(f"CREATE TABLE t AS SELECT * FROM read_parquet({duck.sql_string(str(path))})")
            started = time.perf_counter()
            run(con)
            seconds[name] = time.perf_counter() - started
            con.close()
    base = seconds["regex baseline"]
    return [(name, f"{s:.2f}", f"{rows / s:,.0f}", f"{base / s:.3f}x") for name, s in seconds.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(markdown_table(quality_rows(), ["scrubber", "PII items replaced", "PII-free texts changed"]))
    print()
    print(
        markdown_table(
            speed_rows(args.rows), ["scrubber", f"seconds for {args.rows:,} rows", "rows/s", "speed vs baseline"]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
