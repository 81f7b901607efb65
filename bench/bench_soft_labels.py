"""Soft against hard targets: a student trained on the teacher's distributions or on its answers alone.

The simulator's teacher is right about 94% of the time, wrong more often on borderline comments,
and (``TrafficProfile.label_distributions``) logs a calibrated distribution with every answer: it
is less sure where it is more often wrong. One day of simulated calls is the training pool (the
teacher's labels, and its P(toxic) as the soft label, exactly what ``teacher_labels`` keeps), a
later day's distinct comments that the pool lacks are the test set, scored against the simulator's
hidden truth. The task's student is trained by the trainer on the same rows with hard targets,
with soft targets, and with an even mix (``soft_label_weight``), and scored with 95% bootstrap
intervals and McNemar's exact test against the hard-target student on the same rows.

    python bench/bench_soft_labels.py                    # 4,000 training rows, 3 seeds of data
    python bench/bench_soft_labels.py --train-rows 2000 --seeds 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.core.task import load_task
from distill_pipeline.demo.simulator import TrafficProfile, generate_traffic
from distill_pipeline.students.predict import load_adapter_student
from distill_pipeline.students.specs import TRAINER_MODULE, build_train_spec
from distill_pipeline.students.statistics import bootstrap_interval, compare_paired

TRAIN_DAY, TEST_DAY = "2026-01-05", "2026-01-06"
#: (name, soft_label_weight): None trains on the hard labels alone.
TARGETS = (("hard", None), ("soft", 1.0), ("mixed 50/50", 0.5))
LABELS = (0, 1)


def pools(seed: int, train_rows: int, test_rows: int) -> tuple[pa.Table, list[str], np.ndarray, float]:
    """The training pool (input, label, soft_label) and the test comments with their true labels."""
    task = load_task("toxicity")
    profile = TrafficProfile(label_distributions=True, malformed_rate=0.0, error_rate=0.0, empty_rate=0.0)
    calls = generate_traffic(days=[TRAIN_DAY], records_per_day=train_rows * 2, seed=seed, task=task, profile=profile)
    rows, seen = [], set()
    for row in calls.to_pylist():
        if row["teacher_label"] is None or row["input"] in seen:
            continue
        seen.add(row["input"])
        rows.append((row["input"], row["teacher_label"], row["label_distribution"]["1"], row["true_label"]))
        if len(rows) == train_rows:
            break
    train = pa.table(
        {
            "input": [r[0] for r in rows],
            "label": pa.array([r[1] for r in rows], pa.int64()),
            "soft_label": pa.array([r[2] for r in rows], pa.float64()),
        }
    )
    later = generate_traffic(days=[TEST_DAY], records_per_day=test_rows * 3, seed=seed, task=task, profile=profile)
    test_texts, truth = [], []
    for row in later.to_pylist():
        if row["input"] in seen:
            continue
        seen.add(row["input"])
        test_texts.append(row["input"])
        truth.append(row["true_label"])
        if len(test_texts) == test_rows:
            break
    teacher_accuracy = float(np.mean([r[1] == r[3] for r in rows]))
    return train, test_texts, np.array(truth), teacher_accuracy


def train(train_path: Path, folder: Path, weight: float | None) -> tuple[Path, float]:
    task = load_task("toxicity")
    spec = build_train_spec(task, train_path, folder)
    if weight is not None:
        spec = dataclasses.replace(spec, soft_label_column="soft_label", soft_label_weight=weight)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(spec.to_json())
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", TRAINER_MODULE, "--spec", str(folder / "spec.json")], check=True)
    return folder / "adapter", time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--test-rows", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3, help="independent simulated data sets")
    args = parser.parse_args()
    import torch
    import transformers

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; the toxicity task's student"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-soft-") as scratch:
        for seed in range(args.seeds):
            train_table, texts, truth, teacher_accuracy = pools(seed, args.train_rows, args.test_rows)
            train_path = Path(scratch) / f"train-{seed}.parquet"
            pq.write_table(train_table, train_path)
            predictions = {}
            for name, weight in TARGETS:
                adapter, seconds = train(train_path, Path(scratch) / f"{seed}-{name.split()[0]}", weight)
                student = load_adapter_student(adapter, log=lambda _: None)
                predictions[name] = np.array(student.predict(texts, batch_size=64)[0])
                cells = [
                    f"seed {seed}",
                    name,
                    f"{seconds:.0f}",
                    bootstrap_interval(truth, predictions[name], LABELS).text(),
                ]
                if name != "hard":
                    cells.append(compare_paired(truth, predictions[name], predictions["hard"], LABELS).text())
                else:
                    cells.append(f"(teacher's labels {teacher_accuracy:.1%} right)")
                rows.append(cells)
                print(
                    json.dumps({"seed": seed, "targets": name, "accuracy": float(np.mean(predictions[name] == truth))})
                )
    print(
        f"\n{args.train_rows:,} training rows (the teacher's labels and P(toxic)), {args.test_rows:,} later "
        "comments scored against the simulator's truth\n"
    )
    print(
        markdown_table(rows, ["data", "targets", "train s", "accuracy vs truth [95% CI]", "vs hard targets (paired)"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
