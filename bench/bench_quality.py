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

Levers, one at a time (``--levers``): after the pipeline run (or on the store a ``--keep`` folder
already holds, with ``--reuse``), every named student variant of the task is trained by the
trainer on the largest training set, with the task's spec and that variant's overrides, and scored
against human labels on three sets drawn from the frozen test rows: the in-distribution set (the
logs' toxic rate), a balanced set (every toxic row, as many non-toxic) and a natural-rate set
(every non-toxic row, toxic rows at ``--natural-rate``). Each prediction is the one
``distill-pipeline predict`` makes (``--prior auto``). Two levers need no training: the decision
rule (the base student at its training prior) and an ensemble of the base student with the TF-IDF
baseline. Every accuracy carries a 95% bootstrap interval, and every lever is compared with the
base student on the same rows (paired bootstrap interval of the difference, McNemar's exact test):

    python bench/bench_quality.py --sizes 100% --keep out/ --levers all
    python bench/bench_quality.py --sizes 100% --keep out/ --reuse --levers long_context,label_smoothing
"""

from __future__ import annotations

import argparse
import dataclasses
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
from distill_pipeline.students.statistics import bootstrap_interval, compare_paired
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


#: The levers as student variants of the bench's task, each one change from the base student.
#: A variant of the same name in the task file itself takes precedence.
LEVERS: dict[str, tuple[str, dict[str, object]]] = {
    "long_context": ("256 tokens instead of 128", {"max_length_cap": 256}),
    "early_stopping": (
        "up to 3 epochs, stopped after 2 validations without a better loss",
        {"epochs": 3, "early_stopping_patience": 2, "eval_every_steps": 50},
    ),
    "rank16": ("LoRA rank 16 (alpha 32) instead of 8", {"lora_r": 16, "lora_alpha": 32}),
    "query_value": ("LoRA on query and value only", {"target_modules": ["query", "value"]}),
    "full_finetune": (
        "every weight trained, at a full fine-tune's learning rate",
        {"full_finetune": True, "learning_rate": 5e-5},
    ),
    "label_smoothing": ("label smoothing 0.1 against the teacher's mistakes", {"label_smoothing": 0.1}),
}
LABELS = (0, 1)
#: Levers that need no training of their own.
DECISION_RULE = "training_prior"
ENSEMBLE = "tfidf_ensemble"


def lever_task(task_dir: Path, names: list[str]) -> None:
    """Declare the levers the task file lacks as variants of the bench's copy of the task."""
    import tomllib

    toml = task_dir / "task.toml"
    text = toml.read_text()
    declared = tomllib.loads(text).get("variants", {})
    lines = []
    for name in names:
        if name in declared or name not in LEVERS:
            continue
        description, overrides = LEVERS[name]
        lines += ["", f"[variants.{name}]", f"description = {json.dumps(description)}"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in overrides.items()]
    toml.write_text(text + "\n".join(lines) + "\n")


def scoring_sets(
    tests: dict[str, tuple[list[str], np.ndarray, np.ndarray]], natural_rate: float, seed: int
) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """The in-distribution test set, and a balanced and a natural-rate set drawn from every frozen test row by gold label."""
    rng = np.random.default_rng(seed)
    texts = [t for name in TEST_SETS for t in tests[name][0]]
    gold = np.concatenate([tests[name][1] for name in TEST_SETS])
    teacher = np.concatenate([tests[name][2] for name in TEST_SETS])
    positives, negatives = np.flatnonzero(gold == 1), np.flatnonzero(gold == 0)
    n = min(len(positives), len(negatives))
    balanced = np.sort(
        np.concatenate([rng.choice(positives, n, replace=False), rng.choice(negatives, n, replace=False)])
    )
    wanted = min(round(len(negatives) * natural_rate / (1 - natural_rate)), len(positives))
    natural = np.sort(np.concatenate([negatives, rng.choice(positives, wanted, replace=False)]))
    sets = {"in_distribution": tests["in_distribution"]}
    for name, index in (("balanced 50/50", balanced), (f"natural {natural_rate:.0%}", natural)):
        sets[name] = ([texts[i] for i in index], gold[index], teacher[index])
    return sets


def train_lever(
    task, variant: str, train_path: Path, folder: Path, env: dict[str, str], published: Path | None
) -> tuple[Path, float]:
    """Train one variant with the trainer, as lora_adapter does; its adapter folder and training seconds.

    ``published`` is the pipeline's own run folder for the same training set (spec.json,
    result.json, adapter/): when its spec is this variant's, up to where files lie, its adapter is
    the one this would train, and is taken instead of training it again.
    """
    from distill_pipeline.students.specs import TRAINER_MODULE, build_train_spec

    output = folder / variant
    if (output / "adapter" / "student.json").is_file():
        return output / "adapter", json.loads((output / "lever.json").read_text())["seconds"]
    settings = dataclasses.asdict(task.variant(variant).settings)
    spec = dataclasses.replace(build_train_spec(task, train_path, output), **settings)
    output.mkdir(parents=True, exist_ok=True)
    if published is not None and _same_run(spec, published / "spec.json"):
        result = json.loads((published / "result.json").read_text())
        seconds = result["train_tokens"] / result["train_tokens_per_s"]
        shutil.copytree(published / "adapter", output / "adapter")
    else:
        (output / "spec.json").write_text(spec.to_json())
        started = time.perf_counter()
        run([sys.executable, "-m", TRAINER_MODULE, "--spec", str(output / "spec.json")], env, folder)
        seconds = time.perf_counter() - started
    (output / "lever.json").write_text(json.dumps({"seconds": seconds}))
    return output / "adapter", seconds


def _same_run(spec, published_spec: Path) -> bool:
    if not published_spec.is_file():
        return False
    where = {"train_path", "validation_path", "output_dir", "device"}
    ours = {k: v for k, v in json.loads(spec.to_json()).items() if k not in where}
    theirs = {k: v for k, v in json.loads(published_spec.read_text()).items() if k not in where}
    # A setting newer than the published run's spec took its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(spec) if f.default is not dataclasses.MISSING}
    return set(theirs) <= set(ours) and all(theirs.get(k, defaults.get(k)) == v for k, v in ours.items())


def trainable_parameters(adapter_dir: Path) -> int:
    """The weights the run trained: everything in the adapter folder's safetensors files."""
    from safetensors import safe_open

    total = 0
    for path in adapter_dir.glob("*.safetensors"):
        with safe_open(str(path), "np") as weights:
            total += sum(int(np.prod(weights.get_slice(key).get_shape())) for key in weights.keys())  # noqa: SIM118
    return total


def lever_table(
    root: Path,
    store: LocalStore,
    tests: dict[str, tuple[list[str], np.ndarray, np.ndarray]],
    names: list[str],
    task_dir: Path,
    env: dict[str, str],
    natural_rate: float,
) -> str:
    """Train and score every lever; the markdown table of accuracies with intervals, paired against base."""
    from distill_pipeline.core.published import TrainSets
    from distill_pipeline.core.task import load_task
    from distill_pipeline.students.evaluation import tfidf_logreg_baseline
    from distill_pipeline.trainer.calibration import estimate_prior, shift_probability

    task = load_task(task_dir)
    largest = max(task.splits.train_sizes, key=lambda size: TrainSize.parse(size).fraction)
    train_path = TrainSets(store).train(TrainSize.parse(largest).key, root / "levers")
    train = pq.read_table(train_path)
    sets = scoring_sets(tests, natural_rate, seed=task.splits.seed)
    trained = ["base", *(name for name in names if name in task.variants and name != "base")]

    predictions: dict[str, dict[str, np.ndarray]] = {}
    about: dict[str, tuple[str, str, str]] = {}
    base_probabilities: dict[str, np.ndarray] = {}
    base_rule = None
    published = LoraAdapters(store).current(TrainSize.parse(largest).key)
    published_run = store.root / published["prefix"] if published is not None and hasattr(store, "root") else None
    for name in trained:
        adapter, seconds = train_lever(task, name, train_path, root / "levers", env, published_run)
        student = load_adapter_student(adapter, log=lambda _: None)
        predictions[name] = {}
        for set_name, (texts, _, _) in sets.items():
            predictions[name][set_name] = np.array(student.predict_under_prior(texts, batch_size=64, prior="auto")[0])
            if name == "base":
                at_training_prior, probabilities, _ = student.predict_under_prior(texts, batch_size=64, prior=None)
                base_probabilities[set_name] = np.array(probabilities)[:, 1]
                predictions.setdefault(DECISION_RULE, {})[set_name] = np.array(at_training_prior)
        if name == "base":
            base_rule = student.decision
        about[name] = (task.variant(name).change(), f"{seconds:.0f}", f"{trainable_parameters(adapter):,}")
    about[DECISION_RULE] = ("decide at the training prior, not the estimated one", "0", about["base"][2])

    # The TF-IDF baseline's probabilities are fitted with balanced class weights, i.e. at a prior of
    # one half: moved to the student's training prior, averaged with the student's, then both
    # decided like the student (the threshold moved by the prior EM estimates from the set).
    started = time.perf_counter()
    texts, labels = train["input"].to_pylist(), train["label"].to_pylist()
    tfidf = tfidf_logreg_baseline(texts, labels, seed=0)
    tfidf_seconds = time.perf_counter() - started
    train_prior = base_rule.train_prior
    predictions[ENSEMBLE] = {}
    for set_name, (set_texts, _, _) in sets.items():
        p_tfidf = np.array(tfidf(set_texts).scores(1))
        p_tfidf = np.array([shift_probability(p, 0.5, train_prior) for p in p_tfidf])
        p_mean = (p_tfidf + base_probabilities[set_name]) / 2
        prior = estimate_prior(p_mean.tolist(), train_prior)
        shifted = np.array([shift_probability(p, train_prior, prior) for p in p_mean])
        threshold = shift_probability(base_rule.threshold, train_prior, prior)
        predictions[ENSEMBLE][set_name] = (shifted >= threshold).astype(int)
    about[ENSEMBLE] = (
        "mean of the base student's and the TF-IDF baseline's P(toxic)",
        f"{tfidf_seconds:.0f}",
        about["base"][2] + " + TF-IDF",
    )

    rows = []
    teacher_row = ["GPT-4 (logged answers)", "the teacher", "-", "-"]
    for _, gold, teacher in sets.values():
        teacher_row.append(bootstrap_interval(gold, teacher, LABELS).text())
    rows.append(teacher_row)
    for name in [*trained, DECISION_RULE, ENSEMBLE]:
        cells = [name, *about[name]]
        for set_name, (_, gold, teacher) in sets.items():
            predicted = predictions[name][set_name]
            cell = bootstrap_interval(gold, predicted, LABELS).text()
            if name != "base":
                cell += f"<br>vs base {compare_paired(gold, predicted, predictions['base'][set_name], LABELS).text()}"
            cell += f"<br>vs GPT-4 {compare_paired(gold, predicted, teacher, LABELS).text()}"
            cells.append(cell)
        rows.append(cells)
    header = ["lever", "what it changes", "train s", "trainable params"]
    header += [f"{set_name} ({len(gold)} rows, {gold.mean():.0%} toxic)" for set_name, (_, gold, _) in sets.items()]
    return markdown_table(rows, header, max_cell_chars=None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=JIGSAW_TEACHER_RESPONSES)
    parser.add_argument("--sizes", default="10%,25%,50%,100%", help="training-set sizes, comma-separated")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temp folder)")
    parser.add_argument(
        "--reuse", action="store_true", help="score the store --keep holds, without running the pipeline"
    )
    parser.add_argument(
        "--levers",
        default="",
        help=f"variants to train and score one at a time, comma-separated, or 'all' ({', '.join(LEVERS)})",
    )
    parser.add_argument("--natural-rate", type=float, default=0.09, help="toxic share of the natural-rate scoring set")
    args = parser.parse_args()
    if args.reuse and not (args.keep and (args.keep / "store").is_dir()):
        raise SystemExit("--reuse needs --keep DIR holding a previous run's store")
    levers = list(LEVERS) if args.levers == "all" else [n.strip() for n in args.levers.split(",") if n.strip()]
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: the shared Jigsaw data is needed")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    executable = shutil.which("distill-pipeline") or sys.exit("the distill-pipeline command is not installed")
    logs, gold_by_text = gpt4_logs(args.data, root)
    shutil.rmtree(root / "task", ignore_errors=True)
    task = bench_task(root / "task", sizes)
    lever_task(task, levers)
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
    if not args.reuse:
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
        teacher_row.append(bootstrap_interval(gold, teacher, LABELS).text())
    rows.append(teacher_row)
    verdicts = {}
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
                texts, gold, teacher = tests[name]
                labels, probabilities = student.predict(texts, batch_size=64)
                predicted = np.array(labels)
                calibrated = accuracy(predicted, gold)
                by_argmax = np.array(student.labels.values)[np.array(probabilities).argmax(axis=1)]
                versus = compare_paired(gold, predicted, teacher, LABELS)
                calibrated_row.append(
                    f"{bootstrap_interval(gold, predicted, LABELS).text()}<br>vs GPT-4 {versus.text()}"
                )
                argmax_row.append(bootstrap_interval(gold, by_argmax, LABELS).text())
                verdicts[(size_key, name)] = versus.verdict
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
        + (
            "; pipeline reused from the kept store\n"
            if args.reuse
            else f"; pipeline wall time {pipeline_seconds:.0f}s\n"
        )
    )
    print(
        markdown_table(
            rows, ["model", "training rows", *(f"accuracy vs gold, {n}" for n in TEST_SETS)], max_cell_chars=None
        )
    )
    ablation = read_report(store, ABLATION_PREFIX)
    if ablation is not None:
        print(f"\nAblation (against the teacher's labels): {ablation['recommendation']}")
    champion = Champion(store).current()
    print(f"Champion: {champion['train_size']} ({champion['train_id']})" if champion else "Champion: none promoted")
    for verdict, phrase in (("better", "more accurate than"), ("tied", "tied with"), ("worse", "less accurate than")):
        sizes_with = [size for size, _, _ in reports if {verdicts[(size, n)] for n in TEST_SETS} == {verdict}]
        print(f"Students {phrase} GPT-4 on both test sets (McNemar, alpha 0.05): {', '.join(sizes_with) or 'none'}")
    print("The evaluation reports' scores against the gold table agree with this script's own join.")
    if levers:
        print(
            "\n## Levers, one at a time (trained on the largest training set; predictions as "
            "`distill-pipeline predict` makes them; accuracy vs human labels [95% bootstrap interval], "
            "paired differences in points with McNemar's exact test)\n"
        )
        print(lever_table(root, store, tests, levers, task, env, args.natural_rate))
    print(f"store kept in {root}" if args.keep else "")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
