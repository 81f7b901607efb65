"""Quality benchmark on real data: a student taught only by GPT-4's logged answers, against GPT-4.

GPT-4's real answers to Jigsaw comments (``jigsaw/teacher_responses.parquet`` under
``$DISTILL_SHARED_DATA``, by default ``../shared/data`` beside the checkout; the
``gpt-4-1106-preview`` / ``simple_prompt`` rows) are imported as production logs and the whole
pipeline runs on them, as a user runs it: ``distill-pipeline import --preset jigsaw`` then
``distill-pipeline demo --no-simulate`` (ingest, labels, curation, frozen test sets, training
sets by size, a LoRA student per size, evaluation reports, the ablation and the promotion gate).

Training never sees a human label: the human (gold) ``is_bad`` labels go in only as the store's
gold table (``distill-pipeline gold``), which evaluation alone reads. Afterwards this script joins
the gold labels onto the pipeline's own frozen test sets itself and scores, on the same rows:
GPT-4 (its logged answers, i.e. the test labels), each size's student with its calibrated
decision threshold and the same student at argmax (threshold 0.5, the calibration lever measured
in the same run); it checks that the evaluation reports' own gold scores agree with its own.

    python bench/bench_quality.py                           # sizes 10%, 25%, 50%, 100%
    python bench/bench_quality.py --sizes 100% --keep out/  # one size, keep the store
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill_pipeline.core.layout import ABLATION_PREFIX, eval_report_prefix
from distill_pipeline.core.published import Champion, LoraAdapters, TestSets
from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.tables import read_report
from distill_pipeline.core.task import BUILTIN_TASKS_DIR
from distill_pipeline.data.splitting import TEST_SETS, TrainSize
from distill_pipeline.students.adapters import fetch_adapter
from distill_pipeline.students.predict import load_adapter_student
from distill_pipeline.students.specs import TEXT_COLUMN
from distill_pipeline_tests.conftest import JIGSAW_TEACHER_RESPONSES

TEACHER = ("gpt-4-1106-preview", "simple_prompt")


def gpt4_logs(source: Path, folder: Path) -> tuple[Path, dict[str, int]]:
    """GPT-4's simple-prompt answers as an import table, and the gold label of every comment text."""
    table = pq.read_table(source)
    rows = table.filter(
        pa.compute.and_(
            pa.compute.equal(table["teacher_model"], TEACHER[0]), pa.compute.equal(table["prompt_id"], TEACHER[1])
        )
    )
    path = folder / "gpt4_simple_prompt.parquet"
    pq.write_table(rows, path)
    gold = dict(zip(rows["comment_text"].to_pylist(), rows["is_bad"].to_pylist(), strict=True))
    pq.write_table(rows.select(["comment_text", "is_bad"]), folder / "gold.parquet")
    return path, gold


def bench_task(folder: Path, sizes: list[str]) -> Path:
    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    toml = folder / "task.toml"
    text = toml.read_text()
    default_sizes = 'train_sizes = ["5%", "10%", "25%", "50%", "75%", "100%"]'
    assert default_sizes in text
    toml.write_text(text.replace(default_sizes, "train_sizes = " + json.dumps(sizes)))
    return folder


def run(command: list[str], env: dict[str, str], cwd: Path) -> None:
    print("$", " ".join(command), flush=True)
    completed = subprocess.run(command, env=env, cwd=cwd)
    if completed.returncode != 0:
        raise SystemExit(f"{command[1:3]} exited {completed.returncode}")


def accuracy(predicted: np.ndarray, gold: np.ndarray) -> float:
    return float((predicted == gold).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=JIGSAW_TEACHER_RESPONSES)
    parser.add_argument("--sizes", default="10%,25%,50%,100%", help="training-set sizes, comma-separated")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: the shared Jigsaw data is needed")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    executable = shutil.which("distill-pipeline") or sys.exit("the distill-pipeline command is not installed")
    logs, gold_by_text = gpt4_logs(args.data, root)
    task = bench_task(root / "task", sizes)
    store_dir = root / "store"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(root / "dagster_home"),
        "DISTILL_STORE": str(store_dir),
        "DISTILL_WORK_DIR": str(root / "work"),
    }
    today = dt.datetime.now(dt.UTC).date().isoformat()
    started = time.perf_counter()
    common = [executable, "--task", str(task), "--store", str(store_dir)]
    run([*common, "import", str(logs), "--preset", "jigsaw", "--day", today], env, root)
    gold_table = str(root / "gold.parquet")
    run([*common, "gold", gold_table, "--text-column", "comment_text", "--label-column", "is_bad"], env, root)
    run([*common, "demo", "--days", "1", "--no-simulate"], env, root)
    pipeline_seconds = time.perf_counter() - started

    store = LocalStore(store_dir)
    frozen = TestSets(store)
    pointer = frozen.require_current()
    tests = {}
    for name in TEST_SETS:
        table = pq.read_table(frozen.table(pointer, name, root / "test_sets"))
        texts = table[TEXT_COLUMN].to_pylist()
        missing = [t for t in texts if t not in gold_by_text]
        if missing:
            raise SystemExit(f"{len(missing)} {name} test rows have no gold label (curation rewrote their text?)")
        tests[name] = (
            texts,
            np.array([gold_by_text[t] for t in texts]),
            np.array(table["label"].to_pylist()),
        )

    rows = []
    teacher_row = ["GPT-4 (the teacher's logged answers)", "-"]
    for name in TEST_SETS:
        _, gold, teacher = tests[name]
        teacher_row.append(f"{accuracy(teacher, gold):.4f}")
    rows.append(teacher_row)
    beats = {}
    reports = []
    for size_key in (TrainSize.parse(size).key for size in sizes):
        report = read_report(store, eval_report_prefix(size_key))
        adapter = LoraAdapters(store).current(size_key)
        if report is None or adapter is None:
            raise SystemExit(f"no evaluation of {size_key}: the pipeline run did not finish it")
        reports.append((size_key, report, adapter))
    for size_key, report, adapter in reports:
        with tempfile.TemporaryDirectory() as scratch:
            student = load_adapter_student(fetch_adapter(store, adapter["prefix"], Path(scratch)), log=lambda _: None)
            calibrated_row = [f"student {size_key} (calibrated threshold)", f"{report['train_rows']:,}"]
            argmax_row = [f"student {size_key} (argmax)", f"{report['train_rows']:,}"]
            for name in TEST_SETS:
                texts, gold, _ = tests[name]
                labels, probabilities = student.predict(texts, batch_size=64)
                calibrated = accuracy(np.array(labels), gold)
                argmax = accuracy(np.array(student.labels.values)[np.array(probabilities).argmax(axis=1)], gold)
                calibrated_row.append(f"{calibrated:.4f}")
                argmax_row.append(f"{argmax:.4f}")
                beats[(size_key, name)] = calibrated > accuracy(tests[name][2], gold)
                # The pipeline's own evaluation, from the gold table, must say the same.
                vs_gold = report["test_sets"][name]["vs_gold"]
                reported = (vs_gold["student"]["accuracy"], vs_gold["teacher"]["accuracy"])
                expected = (calibrated, accuracy(tests[name][2], gold))
                if not np.allclose(reported, expected):
                    raise SystemExit(
                        f"{size_key} {name}: eval_report says {reported} against gold, this script {expected}"
                    )
            threshold = student.decision.threshold if student.decision else 0.5
            calibrated_row[0] += f" t={threshold:.3f}"
        rows += [calibrated_row, argmax_row]

    import torch
    import transformers

    print(
        f"\n# Quality on real data: students taught by GPT-4's logged answers, scored against human labels\n"
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{len(gold_by_text):,} distinct GPT-4-labelled comments imported; "
        f"test sets v{pointer['version']}: "
        + ", ".join(f"{name} {len(tests[name][0])} rows" for name in TEST_SETS)
        + f"; pipeline wall time {pipeline_seconds:.0f}s\n"
    )
    print(markdown_table(rows, ["model", "training rows", *(f"accuracy vs gold, {n}" for n in TEST_SETS)]))
    ablation = read_report(store, ABLATION_PREFIX)
    if ablation is not None:
        print(f"\nAblation (against the teacher's labels): {ablation['recommendation']}")
    champion = Champion(store).current()
    print(f"Champion: {champion['train_size']} ({champion['train_id']})" if champion else "Champion: none promoted")
    both = [size for size, _, _ in reports if all(beats[(size, name)] for name in TEST_SETS)]
    print(f"\nStudents beating GPT-4 on both test sets (calibrated): {', '.join(both) or 'none'}")
    print("The evaluation reports' scores against the gold table agree with this script's own join.")
    print(f"store kept in {root}" if args.keep else "")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
