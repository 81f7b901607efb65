"""What the metrics cost an eval_report: each metric module loaded per call, against once per process.

An ``eval_report`` scores four models (student, teacher, majority, TF-IDF + logistic regression)
on two frozen test sets, against the teacher's labels and, where present, gold labels; every score
goes through the project's local ``evaluate`` modules. This script runs the report's whole
evaluation (``evaluate_on_test_sets``) on real Jigsaw comments with the task's label set, twice in
the same process: with ``load_metric``'s per-process cache cleared before every metric call (how
each call loaded its module before) and with the cache kept. The student's own inference is the
same in both and is not what changed, so a fitted TF-IDF model stands in for it here.

    python bench/bench_eval_metrics.py [--data DIR (default: $DISTILL_SHARED_DATA)] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq

from distill_pipeline.core.task import load_task
from distill_pipeline.students import evaluation
from distill_pipeline.students.reports import LabelledTexts, evaluate_on_test_sets
from distill_pipeline_tests.conftest import shared_data_dir


def labelled(name: str, rows: list[dict]) -> LabelledTexts:
    return LabelledTexts(name, [r["input"] for r in rows], [int(r["is_bad"]) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data_dir())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    table = pq.read_table(args.data / "jigsaw" / "train.parquet").to_pylist()
    text_key = "comment_text" if "comment_text" in table[0] else "input"
    rows = [{"input": r[text_key], "is_bad": r["is_bad"]} for r in table]
    train, in_distribution, balanced = rows[:2000], rows[2000:2500], rows[2500:2700]
    task = load_task()
    train_set = labelled("train", train)
    tests = [labelled("in_distribution", in_distribution), labelled("balanced", balanced)]
    student = evaluation.tfidf_logreg_baseline(train_set.texts, train_set.labels, 0, label_values=task.label.values)

    cached_load = evaluation.load_metric

    def uncached(name: str):
        cached_load.cache_clear()
        return cached_load(name)

    def run() -> float:
        started = time.perf_counter()
        evaluate_on_test_sets(task, student, train_set, tests, log=lambda _line: None)
        return time.perf_counter() - started

    timings: dict[str, list[float]] = {"per call (before)": [], "once per process (after)": []}
    for _ in range(args.repeat):
        evaluation.load_metric = uncached  # type: ignore[assignment]
        try:
            timings["per call (before)"].append(run())
        finally:
            evaluation.load_metric = cached_load
        cached_load.cache_clear()
        run()  # the first call of a process loads each module once
        timings["once per process (after)"].append(run())
    base = statistics.median(timings["per call (before)"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"rows: train {len(train)}, in_distribution {len(in_distribution)}, balanced {len(balanced)}; repeat {args.repeat}")
    print("| metric modules loaded | median s | ratio to before |")
    print("|---|---:|---:|")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
