"""Students: a LoRA adapter per training-set size, its evaluation, the size ablation, and the champion."""

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

import dagster as dg

from distill_pipeline.core.layout import (
    ABLATION_PREFIX,
    CHAMPION_CURRENT,
    GOLD_LABELS,
    adapter_prefix,
    champion_history_key,
    eval_report_prefix,
)
from distill_pipeline.core.published import EvalReports, LoraAdapters, TestSets, TrainSets
from distill_pipeline.core.reporting import LineSeries, line_plot_markdown, markdown_table
from distill_pipeline.core.store import ObjectNotFound, ObjectStore
from distill_pipeline.core.tables import MissingTableError, publish_report, read_manifest, read_pointer
from distill_pipeline.data.gold import GoldTableError, read_gold_labels
from distill_pipeline.data.splitting import TEST_SETS
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.partitions import train_sizes
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.core.upstream import fan_in_keys, upstream
from distill_pipeline.defs.data.splits import test_sets, train_sets
from distill_pipeline.defs.students.launchers import K8S_GPU_OP_TAGS
from distill_pipeline.defs.students.resources import GPU_POOL, TrainerResource
from distill_pipeline.students.ablation import analyse_ablation
from distill_pipeline.students.adapters import (
    fetch_adapter,
    fetch_published,
    point_at_adapter,
    publish_adapter,
    read_metrics_log,
)
from distill_pipeline.students.devices import claim_gpu, device_env
from distill_pipeline.students.evaluation import comparison_report
from distill_pipeline.students.predict import load_adapter_student, student_predictor
from distill_pipeline.students.promotion import Candidate, best_candidate, champion_manifest, decide_promotion
from distill_pipeline.students.reports import (
    MAJORITY,
    STUDENT,
    TEACHER,
    TFIDF,
    LabelledTexts,
    evaluate_on_test_sets,
    flat_metrics,
    read_labelled,
    reference_note,
    report_markdown,
    score_student,
    scores_by_test_set,
    speed_markdown,
    with_gold,
)
from distill_pipeline.students.specs import TRAINER_MODULE, build_train_spec, train_id

FINITE_LOSS_CHECK = "finite_validation_loss"
BEATS_MAJORITY_CHECK = "beats_majority_on_validation"
STUDENT_BEATS_BASELINE_CHECK = "student_beats_majority_baseline"
PROMOTION_GATE_CHECK = "promotion_gate"
CHAMPION_READABLE_CHECK = "champion_readable"
# What a server needs of a champion's adapter folder.
ADAPTER_REQUIRED_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/student.json")


@dg.asset(
    deps=[train_sets],
    partitions_def=train_sizes,
    group_name="students",
    kinds={"pytorch", "huggingface"},
    pool=GPU_POOL,
    op_tags=K8S_GPU_OP_TAGS,
    check_specs=[
        dg.AssetCheckSpec(
            FINITE_LOSS_CHECK,
            asset="lora_adapter",
            blocking=True,
            description="Training did not diverge: the exported adapter's validation loss is finite.",
        ),
        dg.AssetCheckSpec(
            BEATS_MAJORITY_CHECK,
            asset="lora_adapter",
            description="The student's validation accuracy beats always answering the majority label.",
        ),
    ],
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    store: StoreResource,
    task: TaskResource,
    trainer: TrainerResource,
    pipes_client: dg.ResourceParam[dg.PipesClient],
) -> dg.MaterializeResult:
    """A LoRA student trained on the partition's training set (via Pipes, on a GPU if any), as a PEFT adapter."""
    object_store = store.open()
    loaded = task.load()
    size = context.partition_key
    train_sets_table = upstream(context, object_store, TrainSets)
    train_manifest = train_sets_table.manifest(size)
    if train_manifest is None:
        raise dg.Failure(f"no training set {size} in {object_store.url}: materialise train_sets first")
    train_sha256 = train_manifest["files"]["train.parquet"]["sha256"]
    train = train_id(build_train_spec(loaded, "train.parquet", "student"), train_sha256)
    prefix = adapter_prefix(size, train)
    reported: dict[str, Any] = {}
    reused = read_manifest(object_store, prefix) is not None
    if reused:
        context.log.info(f"adapter {train} (same settings, same training data) is already published; reusing it")
    else:
        reported = _train_and_publish(
            context, object_store, loaded, trainer, pipes_client, size, train, prefix, train_sets_table
        )
    # The pointer moves last: eval_report reads the partition's adapter through it.
    point_at_adapter(object_store, size, prefix, train)

    with scratch_dir(context) as scratch:
        for name in ("result.json", "metrics.jsonl"):
            fetch_published(object_store, prefix, scratch, under=name)
        result = json.loads((scratch / "result.json").read_text())
        curve = _training_curve(read_metrics_log(scratch / "metrics.jsonl"), size)
    label_counts = train_manifest["stats"]["label_counts"]
    majority_share = max(label_counts.values()) / max(sum(label_counts.values()), 1)
    val_loss, val_accuracy = result["val_loss"], result["val_accuracy"]
    finite = val_loss is not None and math.isfinite(val_loss)
    return dg.MaterializeResult(
        metadata={
            **reported,
            "train_id": train,
            "reused_published_adapter": reused,
            "device": result["device"],
            "train_rows": result["train_rows"],
            "validation_rows": result["validation_rows"],
            "steps": result["steps"],
            "max_length": result["max_length"],
            "train_tokens_per_s": float(result["train_tokens_per_s"]),
            **(
                {
                    "decision_threshold": float(result["decision_threshold"]),
                    "val_accuracy_calibrated": float(result["val_accuracy_calibrated"]),
                }
                if result.get("decision_threshold") is not None
                else {}
            ),
            "val_loss": float(val_loss) if finite else float("nan"),
            "val_accuracy": float(val_accuracy or 0.0),
            "training_curve": dg.MetadataValue.md(curve),
            "student": dg.MetadataValue.json(_student_settings(loaded)),
            "adapter": location(object_store, prefix + "adapter/"),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=FINITE_LOSS_CHECK,
                passed=finite,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"val_loss": float(val_loss) if finite else "not finite"},
            ),
            dg.AssetCheckResult(
                check_name=BEATS_MAJORITY_CHECK,
                passed=(val_accuracy or 0.0) > majority_share,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"val_accuracy": float(val_accuracy or 0.0), "majority_share": float(majority_share)},
            ),
        ],
    )


def _train_and_publish(
    context: dg.AssetExecutionContext,
    store: ObjectStore,
    loaded: Any,
    trainer: TrainerResource,
    client: dg.PipesClient,
    size: str,
    train: str,
    prefix: str,
    train_sets_table: TrainSets,
) -> dict[str, Any]:
    """Run the trainer through Pipes in a stable local folder, publish its adapter; the Pipes metadata."""
    # Named by train id, so a retried step finds its checkpoints here and resumes.
    run_dir = trainer.root() / f"{size}-{train}"
    train_manifest = train_sets_table.manifest(size) or {}
    train_path = train_sets_table.train(size, run_dir / "data")
    spec = build_train_spec(loaded, train_path, run_dir / "run")
    spec_file = run_dir / "train_spec.json"
    spec_file.write_text(spec.to_json())
    # A subprocess trains on this host, on one GPU it holds; a pod or task client (DISTILL_DEPLOYMENT
    # k8s or ecs) gets a GPU of its own from its scheduler.
    local = isinstance(client, dg.PipesSubprocessClient)
    devices = trainer.devices() if local else []
    with claim_gpu(devices, trainer.root() / "gpu-locks", timeout_s=trainer.gpu_wait_timeout_s) as device:
        if not local:
            context.log.info(f"training on a GPU of its own through {type(client).__name__}")
        elif device is None:
            context.log.warning(
                "NOTICE: no GPU on this host (or none configured): training on CPU, which suits only small students"
            )
        else:
            context.log.info(f"training on GPU {device} (CUDA_VISIBLE_DEVICES={device})")
        invocation = client.run(
            context=context,
            command=[sys.executable, "-m", TRAINER_MODULE, "--spec", str(spec_file)],
            env={**device_env(device), "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"},
        )
    reported = dict(invocation.get_materialize_result().metadata or {})
    # Local folders of the run; the published copy is linked instead.
    for local in ("adapter_dir", "merged_dir", "output_dir"):
        reported.pop(local, None)
    publish_adapter(
        store,
        prefix,
        run_dir / "run",
        {
            "size": size,
            "train_id": train,
            "train_sha256": train_manifest["files"]["train.parquet"]["sha256"],
            "test_sets_version": train_manifest["test_sets_version"],
            "student": _student_settings(loaded),
        },
    )
    # Published: the local run only served resuming it.
    shutil.rmtree(run_dir, ignore_errors=True)
    return reported


def _student_settings(loaded: Any) -> dict[str, Any]:
    settings = {k: v for k, v in vars(loaded.student).items() if v is not None}
    return {**settings, "base_model": loaded.student.base_model or "packaged all-MiniLM-L6-v2"}


def _training_curve(metrics: list[dict[str, Any]], size: str) -> str:
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    validation = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    series = [LineSeries("training loss", [s for s, _ in train], [v for _, v in train], "-", "#4f6bed")]
    if validation:
        series.append(
            LineSeries("validation loss", [s for s, _ in validation], [v for _, v in validation], "o--", "#e8793a")
        )
    return line_plot_markdown(series, title=f"Training curve, {size}", xlabel="optimiser step", ylabel="loss")


@dg.asset(
    deps=[lora_adapter, train_sets, test_sets],
    partitions_def=train_sizes,
    group_name="students",
    kinds={"pytorch", "scikitlearn"},
    check_specs=[
        dg.AssetCheckSpec(
            STUDENT_BEATS_BASELINE_CHECK,
            asset="eval_report",
            description="The student beats the majority-class baseline on both frozen test sets.",
        )
    ],
)
def eval_report(context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource) -> dg.MaterializeResult:
    """The partition's student beside the teacher and two baselines on both frozen test sets, with its mistakes."""
    object_store = store.open()
    loaded = task.load()
    size = context.partition_key
    adapter = upstream(context, object_store, LoraAdapters).current(size)
    if adapter is None:
        raise dg.Failure(f"no adapter for {size} in {object_store.url}: materialise lora_adapter first")
    frozen = upstream(context, object_store, TestSets)
    pointer = _require_test_sets(frozen)
    with scratch_dir(context) as scratch:
        adapter_dir = fetch_adapter(object_store, adapter["prefix"], scratch / "student")
        train = read_labelled(upstream(context, object_store, TrainSets).train(size, scratch), "train")
        tests = frozen_test_sets(object_store, frozen, pointer, scratch)
        student = load_adapter_student(adapter_dir, log=context.log.info)
        report = evaluate_on_test_sets(loaded, student_predictor(student), train, tests, log=context.log.info)
    report |= {
        "size": size,
        "train_id": adapter["train_id"],
        "adapter_prefix": adapter["prefix"],
        "train_rows": len(train.texts),
        "test_sets_version": pointer["version"],
    }
    markdown = report_markdown(report)
    prefix = eval_report_prefix(size)
    publish_report(
        object_store,
        prefix,
        report,
        markdown,
        {"size": size, "train_id": adapter["train_id"], "test_sets_version": pointer["version"]},
    )
    student_scores = scores_by_test_set(report, STUDENT)
    majority_scores = scores_by_test_set(report, MAJORITY)
    beats = {name: student_scores[name]["accuracy"] > majority_scores[name]["accuracy"] for name in student_scores}
    per_test_set = {}
    for name, entry in report["test_sets"].items():
        per_test_set[f"confusion_{name}"] = dg.MetadataValue.md(
            entry["confusion"][STUDENT]["confusion_matrix_markdown"]
        )
        if "mistakes_markdown" in entry:
            per_test_set[f"mistakes_{name}"] = dg.MetadataValue.md(entry["mistakes_markdown"])
    gold = {name: e["vs_gold"] for name, e in report["test_sets"].items() if e["vs_gold"]}
    return dg.MaterializeResult(
        metadata={
            **flat_metrics(report),
            "reference": report["reference"],
            "reference_note": dg.MetadataValue.md(reference_note(report)),
            "comparison": dg.MetadataValue.md(
                comparison_report({name: e["vs_teacher"] for name, e in report["test_sets"].items()})
            ),
            **({"comparison_vs_gold": dg.MetadataValue.md(comparison_report(gold))} if gold else {}),
            **per_test_set,
            "speed": dg.MetadataValue.md(speed_markdown(report["speed"])),
            "train_rows": len(train.texts),
            "train_id": adapter["train_id"],
            "test_sets_version": pointer["version"],
            "report": location(object_store, prefix + "report.md"),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=STUDENT_BEATS_BASELINE_CHECK,
                passed=all(beats.values()),
                severity=dg.AssetCheckSeverity.WARN,
                metadata={f"beats_{name}": passed for name, passed in beats.items()},
            )
        ],
    )


#: What the ablation and the champion read: every size's report and current adapter (fanned in
#: over the size partitions), and the frozen test-set version the reports must be measured on.
EVERY_SIZES_REPORT = [
    dg.AssetDep(eval_report, partition_mapping=dg.AllPartitionMapping()),
    dg.AssetDep(lora_adapter, partition_mapping=dg.AllPartitionMapping()),
    dg.AssetDep(test_sets),
]


def current_eval_reports(context: dg.AssetExecutionContext, store: ObjectStore) -> tuple[int, list[dict[str, Any]]]:
    """The test-set version in use and every size's report measured on it with the size's current adapter."""
    pointer = _require_test_sets(upstream(context, store, TestSets))
    evaluated, adapters = upstream(context, store, EvalReports), upstream(context, store, LoraAdapters)
    reports = []
    for size in fan_in_keys(context, EvalReports):
        report = evaluated.report(size)
        adapter = adapters.current(size)
        if report is None:
            context.log.info(f"no eval_report for {size} yet")
        elif report["test_sets_version"] != pointer["version"]:
            context.log.warning(f"eval_report {size} was measured on other test sets; re-materialise it to include it")
        elif adapter is None or adapter["train_id"] != report["train_id"]:
            context.log.warning(f"eval_report {size} is of an older adapter; re-materialise it to include it")
        else:
            reports.append(report)
    if not reports:
        raise dg.Failure(f"no current eval_report in {store.url}: materialise lora_adapter and eval_report first")
    return pointer["version"], sorted(reports, key=lambda r: r["train_rows"])


@dg.asset(
    deps=EVERY_SIZES_REPORT,
    group_name="students",
    kinds={"scipy", "matplotlib"},
)
def ablation_report(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
    """Student accuracy against training-set size: a fitted learning curve and whether more data pays."""
    object_store = store.open()
    version, reports = current_eval_reports(context, object_store)
    student_points = []
    rows = []
    for report in reports:
        student = scores_by_test_set(report, STUDENT)
        tfidf = scores_by_test_set(report, TFIDF)
        student_points.append((report["train_rows"], *(student[name]["accuracy"] for name in TEST_SETS)))
        rows.append(
            (
                report["size"],
                f"{report['train_rows']:,}",
                *(f"{student[name]['accuracy']:.4f}" for name in TEST_SETS),
                *(f"{tfidf[name]['accuracy']:.4f}" for name in TEST_SETS),
            )
        )
    analysis = analyse_ablation(student_points)
    columns = ["size", "training rows", *(f"student {n}" for n in TEST_SETS), *(f"tfidf_logreg {n}" for n in TEST_SETS)]
    by_size = markdown_table(rows, columns)
    summary = {
        "test_sets_version": version,
        "sizes": [r["size"] for r in reports],
        "points": [list(p) for p in student_points],
        "curves": {name: vars(curve) for name, curve in analysis.curves.items()},
        "doubling_gain_points": analysis.doubling_gain_points,
        "worthwhile": analysis.worthwhile,
        "recommendation": analysis.recommendation,
    }
    publish_report(
        object_store,
        ABLATION_PREFIX,
        summary,
        f"{analysis.markdown()}\n\n{by_size}",
        {"test_sets_version": version, "sizes": summary["sizes"]},
    )
    return dg.MaterializeResult(
        metadata={
            "recommendation": dg.MetadataValue.md(analysis.recommendation),
            "more_data_worthwhile": analysis.worthwhile,
            **{f"doubling_gain_points_{name}": float(g) for name, g in analysis.doubling_gain_points.items()},
            "sizes": len(reports),
            "largest_train_rows": analysis.largest_rows,
            "learning_curve": dg.MetadataValue.md(analysis.plot_markdown()),
            "fits": dg.MetadataValue.md(
                "\n".join(f"- {name}: `{curve.formula}` ({curve.reason})" for name, curve in analysis.curves.items())
                or "_too few sizes to fit_"
            ),
            "accuracy_by_size": dg.MetadataValue.md(by_size),
            "report": location(object_store, ABLATION_PREFIX + "report.md"),
        }
    )


class ChampionConfig(dg.Config):
    compare_to: Literal["champion", "teacher"] = "champion"
    """Hold the challenger against the current champion, or against the teacher (needs gold labels)."""
    margin: float = 0.005
    """How much better (as a fraction of the metric, 0.005 = half a point) on every test set."""
    metric: str = "accuracy"
    """The score compared: accuracy, precision, recall, f1 or roc_auc."""


@dg.asset(
    deps=EVERY_SIZES_REPORT,
    group_name="students",
    kinds={"json"},
    check_specs=[
        # Not blocking: a challenger that did not earn promotion is an outcome of a successful run
        # (the champion stays, the reasons are shown), not a failure to retry or to stop for.
        dg.AssetCheckSpec(
            PROMOTION_GATE_CHECK,
            asset="champion",
            description="The best evaluated student beats the reference on both test sets by the margin, or already is the champion.",
        ),
        dg.AssetCheckSpec(
            CHAMPION_READABLE_CHECK,
            asset="champion",
            blocking=True,
            description="champion/current.json exists and points at a complete published adapter.",
        ),
    ],
)
def champion(
    context: dg.AssetExecutionContext, config: ChampionConfig, store: StoreResource, task: TaskResource
) -> dg.MaterializeResult:
    """The student a server should use: the best evaluated size, promoted only if it beats the champion (or teacher)."""
    object_store = store.open()
    version, reports = current_eval_reports(context, object_store)
    by_id = {report["train_id"]: report for report in reports}
    # The challenger is chosen on the test labels, which every report has.
    candidates = [
        Candidate(r["size"], r["train_id"], r["adapter_prefix"], r["train_rows"], scores_by_test_set(r, STUDENT))
        for r in reports
    ]
    challenger = best_candidate(candidates, config.metric)
    report = by_id[challenger.train_id]
    current = _read_champion(object_store)
    context.log.info(
        f"challenger: {challenger.size_key} ({challenger.train_id}); current champion: {current and current['train_id']}"
    )

    if current is not None and current["train_id"] == challenger.train_id:
        promoted, decision_text, reasons = (
            False,
            "kept: the challenger already is the champion",
            ["the best student is the current champion"],
        )
        gate_passed = True
    else:
        if config.compare_to == "teacher":
            # The teacher can be scored only against gold labels, so the challenger is too.
            challenger_scores = scores_by_test_set(report, STUDENT, against="vs_gold")
            floor = scores_by_test_set(report, MAJORITY, against="vs_gold")
            champion_scores = None
        else:
            challenger_scores, floor = challenger.scores, scores_by_test_set(report, MAJORITY)
            champion_scores = _champion_scores(context, object_store, task, current, version, by_id)
        decision = decide_promotion(
            challenger_scores,
            champion_scores,
            scores_by_test_set(report, TEACHER, against="vs_gold"),
            config.margin,
            config.compare_to,
            metric=config.metric,
            floor=floor,
        )
        promoted, reasons, gate_passed = decision.promote, list(decision.reasons), decision.promote
        decision_text = "promoted" if promoted else "kept the current champion: the challenger did not earn promotion"
        if promoted:
            manifest = champion_manifest(
                challenger,
                store_url=object_store.url,
                student=json.loads(object_store.get_bytes(challenger.adapter_prefix + "adapter/student.json")),
                test_sets_version=version,
                decision=decision,
                previous_train_id=current["train_id"] if current else None,
            )
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            object_store.put_bytes(champion_history_key(manifest["promoted_at"], challenger.train_id), body)
            # Last: a server polling current.json sees the new champion only once its history is kept.
            object_store.put_bytes(CHAMPION_CURRENT, body)
    readable, problems, now = _champion_is_readable(object_store)
    metrics = {
        f"champion_{metric}_{name}": float(value)
        for name, scores in ((now or {}).get("metrics") or {}).items()
        for metric, value in scores.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    return dg.MaterializeResult(
        metadata={
            "decision": decision_text,
            "promoted": promoted,
            "challenger_size": challenger.size_key,
            "challenger_train_id": challenger.train_id,
            "champion_size": (now or {}).get("train_size", "none"),
            "champion_train_id": (now or {}).get("train_id", "none"),
            "compare_to": config.compare_to,
            "margin": float(config.margin),
            "reasons": dg.MetadataValue.md("\n".join(f"- {reason}" for reason in reasons)),
            **metrics,
            "manifest": location(object_store, CHAMPION_CURRENT),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=PROMOTION_GATE_CHECK,
                passed=gate_passed,
                severity=dg.AssetCheckSeverity.WARN,
                description="; ".join(reasons),
                metadata={
                    "challenger": challenger.size_key,
                    "compare_to": config.compare_to,
                    "margin": float(config.margin),
                },
            ),
            dg.AssetCheckResult(
                check_name=CHAMPION_READABLE_CHECK,
                passed=readable,
                severity=dg.AssetCheckSeverity.ERROR,
                description="; ".join(problems)
                or ("current.json points at a complete adapter" if now else "no champion yet: nothing to read"),
            ),
        ],
    )


def _require_test_sets(frozen: TestSets) -> dict[str, Any]:
    try:
        return frozen.require_current()
    except MissingTableError as exc:
        raise dg.Failure(str(exc)) from exc


def frozen_test_sets(
    store: ObjectStore, frozen: TestSets, pointer: dict[str, Any], scratch: Path
) -> list[LabelledTexts]:
    """The frozen test sets in use, with the gold labels the store's gold table gives their rows."""
    gold: dict[str, int] = {}
    try:
        store.get_file(GOLD_LABELS, scratch / "gold.parquet")
    except ObjectNotFound:
        pass
    else:
        try:
            gold = read_gold_labels(scratch / "gold.parquet")
        except GoldTableError as exc:
            raise dg.Failure(f"the gold table {GOLD_LABELS} cannot be used: {exc}") from exc
    return [
        with_gold(read_labelled(frozen.table(pointer, name, scratch), name), gold)
        for name in TEST_SETS
    ]


def _read_champion(store: ObjectStore) -> dict[str, Any] | None:
    return read_pointer(store, CHAMPION_CURRENT)


def _champion_scores(
    context: dg.AssetExecutionContext,
    store: ObjectStore,
    task: TaskResource,
    current: dict[str, Any] | None,
    version: int,
    by_id: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]] | None:
    """The champion's scores on the test sets in use: from its manifest, from a current report of
    the same adapter, or measured again when the test sets were rebuilt since its promotion."""
    if current is None:
        return None
    if current["train_id"] in by_id:
        return scores_by_test_set(by_id[current["train_id"]], STUDENT)
    if current["test_sets_version"] == version:
        return current["metrics"]
    context.log.info(f"re-measuring the champion {current['train_id']} on test sets v{version}")
    frozen = upstream(context, store, TestSets)
    pointer = _require_test_sets(frozen)
    with scratch_dir(context) as scratch:
        adapter_dir = fetch_adapter(store, current["adapter_prefix"], scratch / "champion")
        tests = frozen_test_sets(store, frozen, pointer, scratch)
        student = student_predictor(load_adapter_student(adapter_dir, log=context.log.info))
        return score_student(task.load(), student, tests)


def _champion_is_readable(store: ObjectStore) -> tuple[bool, list[str], dict[str, Any] | None]:
    """Read current.json back as a server would, and check the adapter it names is complete.

    With no champion yet there is nothing a server could misread: the promotion gate says why
    none was promoted, and this check passes.
    """
    try:
        current = json.loads(store.get_bytes(CHAMPION_CURRENT))
    except ObjectNotFound:
        return True, [], None
    except json.JSONDecodeError as exc:
        return False, [f"current.json is not JSON: {exc}"], None
    manifest = read_manifest(store, current.get("adapter_prefix", ""))
    if manifest is None:
        return False, [f"the adapter {current.get('adapter_prefix')} has no manifest"], current
    missing = [name for name in ADAPTER_REQUIRED_FILES if name not in manifest["files"]]
    return not missing, [f"the adapter lacks {name}" for name in missing], current
