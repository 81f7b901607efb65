"""Label shift: the student's decision at its training prior against the prior estimated from the texts.

Traffic's share of positives is rarely the training pool's (GPT-4's logged Jigsaw comments are
about 21% toxic; Kaggle's natural rate is about 9%). This script takes the store a run of
``bench/bench_quality.py --keep DIR`` left (a champion trained on GPT-4's answers only, its frozen
test sets, the human gold table), and draws from the frozen test rows, by their human labels, a
natural-rate set (every non-toxic row, toxic rows at 9%) and a balanced set (as many non-toxic as
toxic rows). On each it scores, against the human labels: GPT-4 (its logged answers), the student
at its training prior (``predict --prior train``) and at the prior EM estimates from the set itself
(``predict --prior auto``, the default), with 95% bootstrap intervals over rows, and the paired
difference auto - train with its interval and McNemar's exact p-value.

    python bench/bench_quality.py --sizes 100% --keep out/
    python bench/bench_label_shift.py out/ [--natural-rate 0.09] [--draws 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow.parquet as pq

from distill_pipeline.core.published import Champion, TestSets
from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.core.store import LocalStore
from distill_pipeline.data.splitting import TEST_SETS
from distill_pipeline.students.adapters import fetch_adapter
from distill_pipeline.students.predict import load_adapter_student
from distill_pipeline.students.statistics import bootstrap_interval, compare_paired

LABELS = (0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the folder bench_quality.py --keep left")
    parser.add_argument("--natural-rate", type=float, default=0.09)
    parser.add_argument("--draws", type=int, default=5, help="natural-rate sets drawn (different toxic rows)")
    args = parser.parse_args()
    store = LocalStore(args.folder / "store")
    champion = Champion(store).current()
    if champion is None:
        raise SystemExit(f"no champion in {store.url}: run bench/bench_quality.py --keep {args.folder} first")
    gold = {r["comment_text"]: int(r["is_bad"]) for r in pq.read_table(args.folder / "gold.parquet").to_pylist()}
    frozen = TestSets(store)
    pointer = frozen.require_current()
    rows = []
    for name in TEST_SETS:
        table = pq.read_table(frozen.table(pointer, name, args.folder / "label_shift")).to_pylist()
        rows += [(r["input"], int(r["label"]), gold[r["input"]]) for r in table if r["input"] in gold]
    texts = [r[0] for r in rows]
    teacher, truth = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    student = load_adapter_student(
        fetch_adapter(store, champion["adapter_prefix"], args.folder / "champion"), log=lambda _: None
    )
    rule = student.decision
    if rule is None or rule.train_prior is None:
        raise SystemExit("the champion records no training prior: train it with this version of the trainer")

    rng = np.random.default_rng(0)
    positives, negatives = np.flatnonzero(truth == 1), np.flatnonzero(truth == 0)
    sets = []
    for draw in range(args.draws):
        wanted = round(len(negatives) * args.natural_rate / (1 - args.natural_rate))
        chosen = rng.choice(positives, min(wanted, len(positives)), replace=False)
        sets.append((f"natural {args.natural_rate:.0%} #{draw + 1}", np.concatenate([negatives, chosen])))
    n = min(len(positives), len(negatives))
    sets.append(
        ("balanced", np.concatenate([rng.choice(positives, n, replace=False), rng.choice(negatives, n, replace=False)]))
    )

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(
        f"champion {champion['train_size']} ({champion['train_id']}), trained at {rule.train_prior:.1%} toxic; "
        f"{len(rows)} frozen test rows with human labels ({len(positives)} toxic)"
    )
    table_rows = []
    for name, index in sets:
        subset = [texts[i] for i in index]
        y = truth[index]
        at_train, _, _ = student.predict_under_prior(subset, prior=None)
        at_auto, _, estimated = student.predict_under_prior(subset, prior="auto")
        predicted = {
            "GPT-4": teacher[index],
            "student, training prior": np.array(at_train),
            "student, estimated prior": np.array(at_auto),
        }
        cells = [name, f"{len(index)} ({y.mean():.1%})", f"{estimated:.1%}" if estimated is not None else "-"]
        for labels in predicted.values():
            score = bootstrap_interval(y, labels, LABELS)
            cells.append(f"{score.estimate:.4f} [{score.low:.3f}, {score.high:.3f}]")
        paired = compare_paired(y, predicted["student, estimated prior"], predicted["student, training prior"], LABELS)
        difference = paired.difference
        cells.append(
            f"{difference.estimate:+.4f} [{difference.low:+.3f}, {difference.high:+.3f}] p={paired.p_value:.3g}"
        )
        table_rows.append(cells)
    print(
        markdown_table(
            table_rows,
            ["set", "rows (toxic)", "estimated prior", *predicted, "estimated - training prior (paired)"],
        )
    )
    print(json.dumps({"train_prior": rule.train_prior, "threshold": rule.threshold}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
