"""Students: a LoRA adapter per training-set size and student variant, its evaluation, the size ablation, and the champion."""

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
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
from distill_pipeline.core.published import PREDICTIONS_FILE, EvalReports, LoraAdapters, TestSets, TrainSets
from distill_pipeline.core.reporting import LineSeries, line_plot_markdown, markdown_table
from distill_pipeline.core.store import ObjectNotFound, ObjectStore
from distill_pipeline.core.tables import MissingTableError, publish_report, read_manifest, read_pointer
from distill_pipeline.core.task import BASE_VARIANT, Task
from distill_pipeline.data.gold import GoldTableError, read_gold_labels
from distill_pipeline.data.splitting import TEST_SETS
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.partitions import size_and_variant, sizes_and_variants
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.core.upstream import fan_in_keys, upstream
from distill_pipeline.defs.data.splits import test_sets, train_sets
from distill_pipeline.defs.students.launchers import INFERENCE_OP_TAGS, training_op_tags
from distill_pipeline.defs.students.resources import GPU_POOL, TrainerResource
from distill_pipeline.students.ablation import analyse_ablation
from distill_pipeline.students.adapters import (
    fetch_adapter,
    fetch_published,
    point_at_adapter,
    publish_adapter,
    read_metrics_log,
)
from distill_pipeline.students.devices import device_env, training_command
from distill_pipeline.students.evaluation import comparison_report
from distill_pipeline.students.experiments import stored_parameters
from distill_pipeline.students.predict import load_adapter_student, student_predictor
from distill_pipeline.students.promotion import (
    Candidate,
    Labels,
    best_candidate,
    champion_manifest,
    decide_promotion,
)
from distill_pipeline.students.reports import (
    MAJORITY,
    STUDENT,
    TFIDF,
    LabelledTexts,
    RowPredictions,
    evaluate_on_test_sets,
    flat_metrics,
    read_labelled,
    read_row_predictions,
    reference_note,
    report_markdown,
    scores_by_test_set,
    speed_markdown,
    split_row_predictions,
    with_gold,
)
from distill_pipeline.students.specs import build_train_spec, train_id
from distill_pipeline.students.traffic import deployment_prior

FINITE_LOSS_CHECK = "finite_validation_loss"
BEATS_MAJORITY_CHECK = "beats_majority_on_validation"
STUDENT_BEATS_BASELINE_CHECK = "student_beats_majority_baseline"
PROMOTION_GATE_CHECK = "promotion_gate"
CHAMPION_READABLE_CHECK = "champion_readable"
# What a server needs of a champion's adapter folder: a LoRA adapter over its base, or (a full
# fine-tune) the whole model.
ADAPTER_REQUIRED_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/student.json")
FULL_MODEL_REQUIRED_FILES = ("adapter/config.json", "adapter/model.safetensors", "adapter/student.json")


@dg.asset(
    deps=[train_sets],
    partitions_def=sizes_and_variants,
    group_name="students",
    kinds={"pytorch", "huggingface"},
    pool=GPU_POOL,
    op_tags=training_op_tags(),
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
    """The partition's student variant trained on its size's training set (via Pipes, on a GPU if any), as a PEFT adapter."""
    object_store = store.open()
    loaded = task.load()
    size, variant = _student_partition(context, loaded)
    train_sets_table = upstream(context, object_store, TrainSets)
    train_manifest = train_sets_table.manifest(size)
    if train_manifest is None:
        raise dg.Failure(f"no training set {size} in {object_store.url}: materialise train_sets first")
    train_sha256 = train_manifest["files"]["train.parquet"]["sha256"]
    train = train_id(build_train_spec(loaded, "train.parquet", "student", variant), train_sha256)
    prefix = adapter_prefix(size, train)
    reported: dict[str, Any] = {}
    reused = read_manifest(object_store, prefix) is not None
    if not reused:
        trained = _train_and_publish(
            context, object_store, loaded, trainer, pipes_client, size, variant, train, prefix, train_sets_table
        )
        # None: a run of the same train id published it while this one waited for that run.
        reused, reported = trained is None, trained or {}
    if reused:
        context.log.info(f"adapter {train} (same settings, same training data) is already published; reusing it")
    # The pointer moves last: eval_report reads the partition's adapter through it.
    point_at_adapter(object_store, size, prefix, train, variant)

    with scratch_dir(context) as scratch:
        for name in ("result.json", "metrics.jsonl"):
            fetch_published(object_store, prefix, scratch, under=name)
        result = json.loads((scratch / "result.json").read_text())
        curve = _training_curve(read_metrics_log(scratch / "metrics.jsonl"), f"{size}, {variant}")
    label_counts = train_manifest["stats"]["label_counts"]
    majority_share = max(label_counts.values()) / max(sum(label_counts.values()), 1)
    val_loss, val_accuracy = result["val_loss"], result["val_accuracy"]
    finite = val_loss is not None and math.isfinite(val_loss)
    return dg.MaterializeResult(
        metadata={
            **reported,
            "train_id": train,
            "variant": variant,
            "variant_change": loaded.variant(variant).change(),
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
            "student": dg.MetadataValue.json(_student_settings(loaded, variant)),
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
    variant: str,
    train: str,
    prefix: str,
    train_sets_table: TrainSets,
) -> dict[str, Any] | None:
    """Run the trainer through Pipes in a stable local folder, publish its adapter; the Pipes
    metadata, or None when a run of the same train id published it while this one waited."""
    # Named by train id, so a retried step finds its checkpoints here and resumes; held by one run
    # at a time, so a concurrent run of the same spec and data neither shares nor deletes it.
    run_name = f"{size}-{train}"
    run_dir = trainer.root() / run_name
    with trainer.training_run(run_name, context.log.info):
        if read_manifest(store, prefix) is not None:
            return None
        train_manifest = train_sets_table.manifest(size) or {}
        train_path = train_sets_table.train(size, run_dir / "data")
        spec = build_train_spec(loaded, train_path, run_dir / "run", variant)
        spec_file = run_dir / "train_spec.json"
        spec_file.write_text(spec.to_json())
        # A subprocess trains on this host, on the GPUs it holds; a pod or task client
        # (DISTILL_DEPLOYMENT k8s or ecs) gets GPUs of its own from its scheduler.
        local = isinstance(client, dg.PipesSubprocessClient)
        gpus = trainer.gpus_per_step
        with trainer.gpus(gpus, context.log.info) if local else contextlib.nullcontext([]) as held:
            if not local:
                processes = gpus
                context.log.info(f"training on {gpus} GPU(s) of its own through {type(client).__name__}")
            elif not held:
                processes = 1
                context.log.warning(
                    "NOTICE: no GPU on this host (or none configured): training on CPU in one process, "
                    "which suits only small students"
                )
            else:
                processes = len(held)
                context.log.info(f"training on GPU {', '.join(held)} (CUDA_VISIBLE_DEVICES={','.join(held)})")
            invocation = client.run(
                context=context,
                command=training_command(spec_file, processes),
                env={**device_env(held), "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"},
            )
        reported = dict(invocation.get_materialize_result().metadata or {})
        # Local folders of the run; the published copy is linked instead.
        for local_path in ("adapter_dir", "merged_dir", "output_dir"):
            reported.pop(local_path, None)
        publish_adapter(
            store,
            prefix,
            run_dir / "run",
            {
                "size": size,
                "variant": variant,
                "train_id": train,
                "train_sha256": train_manifest["files"]["train.parquet"]["sha256"],
                "test_sets_version": train_manifest["test_sets_version"],
                "student": _student_settings(loaded, variant),
            },
        )
        # Published: the local run only served resuming it.
        shutil.rmtree(run_dir, ignore_errors=True)
    return reported


def _student_settings(loaded: Task, variant: str) -> dict[str, Any]:
    student = loaded.variant(variant).settings
    settings = {k: v for k, v in vars(student).items() if v is not None}
    return {**settings, "base_model": student.base_model or "packaged all-MiniLM-L6-v2"}


def _student_partition(context: dg.AssetExecutionContext, loaded: Task) -> tuple[str, str]:
    """The run's size and variant; a variant the task no longer declares fails with the ones it does."""
    size, variant = size_and_variant(context.partition_key)
    if variant not in loaded.variants:
        raise dg.Failure(
            f"the task {loaded.id!r} declares no student variant {variant!r} (it has {list(loaded.variants)}); "
            "add it under [variants] or launch another partition"
        )
    return size, variant


def _training_curve(metrics: list[dict[str, Any]], partition: str) -> str:
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    validation = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    series = [LineSeries("training loss", [s for s, _ in train], [v for _, v in train], "-", "#4f6bed")]
    if validation:
        series.append(
            LineSeries("validation loss", [s for s, _ in validation], [v for _, v in validation], "o--", "#e8793a")
        )
    return line_plot_markdown(series, title=f"Training curve, {partition}", xlabel="optimiser step", ylabel="loss")


@dg.asset(
    deps=[lora_adapter, train_sets, test_sets],
    partitions_def=sizes_and_variants,
    group_name="students",
    kinds={"pytorch", "scikitlearn"},
    pool=GPU_POOL,
    op_tags=INFERENCE_OP_TAGS,
    check_specs=[
        dg.AssetCheckSpec(
            STUDENT_BEATS_BASELINE_CHECK,
            asset="eval_report",
            description="The student beats the majority-class baseline on both frozen test sets.",
        )
    ],
)
def eval_report(
    context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource, trainer: TrainerResource
) -> dg.MaterializeResult:
    """The partition's student beside the teacher and two baselines on both frozen test sets, with its mistakes."""
    object_store = store.open()
    loaded = task.load()
    size, variant = _student_partition(context, loaded)
    adapter = upstream(context, object_store, LoraAdapters).current(size, variant)
    if adapter is None:
        raise dg.Failure(f"no adapter for {size}, {variant} in {object_store.url}: materialise lora_adapter first")
    frozen = upstream(context, object_store, TestSets)
    pointer = _require_test_sets(frozen)
    with scratch_dir(context) as scratch:
        adapter_dir = fetch_adapter(object_store, adapter["prefix"], scratch / "student")
        fetch_published(object_store, adapter["prefix"], scratch / "run", under="result.json")
        trained = json.loads((scratch / "run" / "result.json").read_text())
        parameters = stored_parameters(adapter_dir)
        train = read_labelled(upstream(context, object_store, TrainSets).train(size, scratch), "train")
        tests = frozen_test_sets(object_store, frozen, pointer, scratch)
        in_distribution = next(t for t in tests if t.name == "in_distribution")
        positive = loaded.label.positive
        prior = (
            None
            if positive is None
            else deployment_prior(loaded.monitoring.deployment_prior, in_distribution.labels, positive)
        )
        with trainer.inference_device(context.log.info) as device:
            student = load_adapter_student(adapter_dir, device=device, log=context.log.info)
            at_prior = None if prior is None else (prior, student_predictor(student, prior=prior.share))
            report = evaluate_on_test_sets(
                loaded, student_predictor(student), train, tests, log=context.log.info, at_prior=at_prior
            )
    report |= {
        "size": size,
        "variant": variant,
        "variant_change": loaded.variant(variant).change(),
        "train_id": adapter["train_id"],
        "adapter_prefix": adapter["prefix"],
        "train_rows": len(train.texts),
        "train_seconds": _train_seconds(trained),
        "trainable_parameters": parameters,
        "test_sets_version": pointer["version"],
    }
    report, rows = split_row_predictions(report)
    markdown = report_markdown(report)
    prefix = eval_report_prefix(size, variant)
    with scratch_dir(context) as scratch:
        import pyarrow.parquet as pq

        pq.write_table(rows, scratch / PREDICTIONS_FILE)
        publish_report(
            object_store,
            prefix,
            report,
            markdown,
            {
                "size": size,
                "variant": variant,
                "train_id": adapter["train_id"],
                "test_sets_version": pointer["version"],
            },
            files={PREDICTIONS_FILE: scratch / PREDICTIONS_FILE},
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
            "variant": variant,
            "trainable_parameters": parameters,
            **({"train_seconds": float(report["train_seconds"])} if report["train_seconds"] is not None else {}),
            "test_sets_version": pointer["version"],
            "report": location(object_store, prefix + "report.md"),
            "predictions": location(object_store, prefix + PREDICTIONS_FILE),
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


#: What the ablation, the experiments report and the champion read: every size and variant's report
#: and current adapter (fanned in over the student partitions), and the frozen test-set version the
#: reports must be measured on.
EVERY_SIZES_REPORT = [
    dg.AssetDep(eval_report, partition_mapping=dg.AllPartitionMapping()),
    dg.AssetDep(lora_adapter, partition_mapping=dg.AllPartitionMapping()),
    dg.AssetDep(test_sets),
]


@dataclass(frozen=True)
class Evaluated:
    """One size and variant's current evaluation: its report and its predictions on every test row."""

    size: str
    variant: str
    report: dict[str, Any]
    rows: dict[str, RowPredictions]

    @property
    def name(self) -> str:
        return f"{self.size}/{self.variant}"

    def student(self, test_set: str) -> Any:
        return self.rows[test_set].models[STUDENT]


def current_eval_reports(
    context: dg.AssetExecutionContext, store: ObjectStore, scratch: Path
) -> tuple[int, list[Evaluated]]:
    """The test-set version in use and every size and variant's evaluation measured on it with its
    current adapter, with per-row predictions (smallest training set first, base first)."""
    pointer = _require_test_sets(upstream(context, store, TestSets))
    evaluated, adapters = upstream(context, store, EvalReports), upstream(context, store, LoraAdapters)
    found = []
    for key in fan_in_keys(context, EvalReports):
        size, variant = size_and_variant(key)
        report = evaluated.report(size, variant)
        adapter = adapters.current(size, variant)
        if report is None:
            context.log.info(f"no eval_report for {key} yet")
        elif report["test_sets_version"] != pointer["version"]:
            context.log.warning(f"eval_report {key} was measured on other test sets; re-materialise it to include it")
        elif adapter is None or adapter["train_id"] != report["train_id"]:
            context.log.warning(f"eval_report {key} is of an older adapter; re-materialise it to include it")
        else:
            try:
                path = evaluated.predictions(size, variant, scratch / key.replace("|", "-"))
            except MissingTableError:
                context.log.warning(f"eval_report {key} has no per-row predictions; re-materialise it to include it")
                continue
            found.append(Evaluated(size, variant, report, read_row_predictions(path)))
    if not found:
        raise dg.Failure(f"no current eval_report in {store.url}: materialise lora_adapter and eval_report first")
    first = found[0]
    for other in found[1:]:
        for name, rows in first.rows.items():
            if name not in other.rows or not (other.rows[name].labels == rows.labels).all():
                raise dg.Failure(
                    f"eval_report {other.name} and {first.name} disagree on the labels of test set {name} "
                    f"v{pointer['version']}: re-materialise both"
                )
    return pointer["version"], sorted(
        found, key=lambda e: (e.report["train_rows"], e.variant != BASE_VARIANT, e.variant)
    )


def _train_seconds(result: dict[str, Any]) -> float | None:
    """Training time from the trainer's result.json (its own figure, else tokens over tokens per second)."""
    if result.get("train_seconds") is not None:
        return float(result["train_seconds"])
    tokens, rate = result.get("train_tokens"), result.get("train_tokens_per_s")
    return float(tokens / rate) if tokens and rate else None


def _labels(loaded: Task) -> Labels:
    return Labels(tuple(loaded.label.values), loaded.label.positive)


@dg.asset(
    deps=EVERY_SIZES_REPORT,
    group_name="students",
    kinds={"scipy", "matplotlib"},
)
def ablation_report(
    context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource
) -> dg.MaterializeResult:
    """Student accuracy against training-set size per variant: a fitted learning curve and whether more data pays."""
    object_store = store.open()
    loaded = task.load()
    with scratch_dir(context) as scratch:
        version, evaluated = current_eval_reports(context, object_store, scratch)
    by_variant: dict[str, list[Evaluated]] = {}
    for entry in evaluated:
        by_variant.setdefault(entry.variant, []).append(entry)
    headline = BASE_VARIANT if BASE_VARIANT in by_variant else next(iter(by_variant))
    analyses = {}
    rows = []
    for variant, entries in by_variant.items():
        points = [
            (e.report["train_rows"], *(scores_by_test_set(e.report, STUDENT)[name]["accuracy"] for name in TEST_SETS))
            for e in entries
        ]
        correct = {name: [e.student(name) == e.rows[name].labels for e in entries] for name in TEST_SETS}
        analyses[variant] = analyse_ablation(points, correct=correct, seed=loaded.promotion.seed)
        for e in entries:
            student, tfidf = scores_by_test_set(e.report, STUDENT), scores_by_test_set(e.report, TFIDF)
            rows.append(
                (
                    e.size,
                    variant,
                    f"{e.report['train_rows']:,}",
                    *(_with_interval(student[name], "accuracy") for name in TEST_SETS),
                    *(_with_interval(tfidf[name], "accuracy") for name in TEST_SETS),
                )
            )
    analysis = analyses[headline]
    columns = [
        "size",
        "variant",
        "training rows",
        *(f"student {n}" for n in TEST_SETS),
        *(f"tfidf_logreg {n}" for n in TEST_SETS),
    ]
    by_size = markdown_table(rows, columns)
    per_variant = markdown_table(
        [
            (
                variant,
                len(by_variant[variant]),
                *(
                    f"{a.doubling_gain_points[name]:+.2f} [{a.gain_intervals[name][0]:+.2f}, {a.gain_intervals[name][1]:+.2f}]"
                    if a.gain_intervals
                    else "–"
                    for name in TEST_SETS
                ),
                a.recommendation.split(" Fits:")[0],
            )
            for variant, a in analyses.items()
        ],
        ["variant", "sizes", *(f"doubling gain, points: {n}" for n in TEST_SETS), "recommendation"],
    )
    summary = {
        "test_sets_version": version,
        "headline_variant": headline,
        "sizes": [e.size for e in by_variant[headline]],
        "points": [[p.train_rows, p.accuracy_in_distribution, p.accuracy_balanced] for p in analysis.points],
        "curves": {name: vars(curve) for name, curve in analysis.curves.items()},
        "doubling_gain_points": analysis.doubling_gain_points,
        "doubling_gain_interval_points": analysis.gain_intervals,
        "accuracy_intervals": analysis.accuracy_intervals,
        "worthwhile": analysis.worthwhile,
        "recommendation": analysis.recommendation,
        "variants": {
            variant: {
                "sizes": [e.size for e in by_variant[variant]],
                "doubling_gain_points": a.doubling_gain_points,
                "doubling_gain_interval_points": a.gain_intervals,
                "worthwhile": a.worthwhile,
                "recommendation": a.recommendation,
            }
            for variant, a in analyses.items()
        },
    }
    publish_report(
        object_store,
        ABLATION_PREFIX,
        summary,
        f"{analysis.markdown()}\n\n### Every variant\n\n{per_variant}\n\n{by_size}",
        {"test_sets_version": version, "sizes": summary["sizes"], "variants": list(analyses)},
    )
    intervals = {
        f"doubling_gain_points_{name}_{end}": float(value)
        for name, (low, high) in (analysis.gain_intervals or {}).items()
        for end, value in (("low", low), ("high", high))
    }
    return dg.MaterializeResult(
        metadata={
            "recommendation": dg.MetadataValue.md(analysis.recommendation),
            "more_data_worthwhile": analysis.worthwhile,
            "headline_variant": headline,
            **{f"doubling_gain_points_{name}": float(g) for name, g in analysis.doubling_gain_points.items()},
            **intervals,
            "sizes": len(by_variant[headline]),
            "largest_train_rows": analysis.largest_rows,
            "learning_curve": dg.MetadataValue.md(analysis.plot_markdown()),
            "fits": dg.MetadataValue.md(
                "\n".join(f"- {name}: `{curve.formula}` ({curve.reason})" for name, curve in analysis.curves.items())
                or "_too few sizes to fit_"
            ),
            "variants": dg.MetadataValue.md(per_variant),
            "accuracy_by_size": dg.MetadataValue.md(by_size),
            "report": location(object_store, ABLATION_PREFIX + "report.md"),
        }
    )


def _with_interval(scores: dict[str, Any], metric: str) -> str:
    interval = scores.get(f"{metric}_ci")
    value = f"{scores[metric]:.4f}"
    return value + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


class ChampionConfig(dg.Config):
    compare_to: Literal["champion", "teacher"] = "champion"
    """Hold the challenger against the current champion, or against the teacher (needs gold labels)."""
    margin: float = 0.005
    """On top of a significant paired test, how much better on each decisive test set (0.005 = half a point)."""
    metric: Literal["accuracy", "precision", "recall", "f1"] = "accuracy"
    """The score compared: accuracy (McNemar's exact test), precision, recall or f1 (paired bootstrap)."""
    alpha: float | None = None
    """The paired test's significance level; None: the task's [promotion] alpha."""


@dg.asset(
    deps=EVERY_SIZES_REPORT,
    group_name="students",
    kinds={"json"},
    # Re-measuring the champion on rebuilt test sets runs a student.
    pool=GPU_POOL,
    op_tags=INFERENCE_OP_TAGS,
    check_specs=[
        # Not blocking: a challenger that did not earn promotion is an outcome of a successful run
        # (the champion stays, the reasons are shown), not a failure to retry or to stop for.
        dg.AssetCheckSpec(
            PROMOTION_GATE_CHECK,
            asset="champion",
            description="The challenger is significantly better than the reference (paired test on the same rows) on the decisive test sets and worse on none, or already is the champion.",
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
    context: dg.AssetExecutionContext,
    config: ChampionConfig,
    store: StoreResource,
    task: TaskResource,
    trainer: TrainerResource,
) -> dg.MaterializeResult:
    """The student a server should use: the best evaluated size and variant (the cheapest within the noise of the best), promoted only if significantly better than the champion (or teacher)."""
    object_store = store.open()
    loaded = task.load()
    promotion = loaded.promotion
    alpha = promotion.alpha if config.alpha is None else config.alpha
    labels = _labels(loaded)
    with scratch_dir(context) as scratch:
        version, evaluated = current_eval_reports(context, object_store, scratch)
    by_id = {entry.report["train_id"]: entry for entry in evaluated}
    truth = {name: rows.labels for name, rows in evaluated[0].rows.items()}
    # The challenger is chosen on the test labels, which every report has.
    candidates = [
        Candidate(
            e.size,
            e.report["train_id"],
            e.report["adapter_prefix"],
            e.report["train_rows"],
            scores_by_test_set(e.report, STUDENT),
            e.variant,
            {name: e.student(name) for name in e.rows},
            e.report.get("trainable_parameters"),
            e.report["speed"]["single_request"]["latency_p50_ms"],
        )
        for e in evaluated
    ]
    choice = best_candidate(
        candidates, truth, labels, metric=config.metric, alpha=alpha, resamples=promotion.resamples, seed=promotion.seed
    )
    challenger = choice.chosen
    chosen = by_id[challenger.train_id]
    current = _read_champion(object_store)
    context.log.info(
        f"challenger: {challenger.name} ({challenger.train_id}); current champion: {current and current['train_id']}"
    )

    comparisons: tuple[Any, ...] = ()
    if current is not None and current["train_id"] == challenger.train_id:
        promoted, decision_text, reasons = (
            False,
            "kept: the challenger already is the champion",
            ["the best student is the current champion"],
        )
        gate_passed = True
    else:
        if config.compare_to == "teacher":
            # The teacher can be scored only against gold labels, so the challenger is too, on those rows.
            gold_truth, student, reference, floor = {}, {}, {}, {}
            for name, rows in chosen.rows.items():
                picked, gold = rows.reference("vs_gold")
                if len(picked):
                    gold_truth[name], reference[name] = gold, rows.labels[picked]
                    student[name], floor[name] = rows.models[STUDENT][picked], rows.models[MAJORITY][picked]
            decide_truth, held_against = gold_truth, reference
        else:
            decide_truth, student = truth, challenger.predictions
            floor = {name: rows.models[MAJORITY] for name, rows in chosen.rows.items()}
            held_against = _champion_predictions(context, object_store, loaded, trainer, current, by_id)
        decision = decide_promotion(
            decide_truth,
            student,
            held_against,
            labels,
            config.compare_to,
            metric=config.metric,
            alpha=alpha,
            margin=config.margin,
            decisive=promotion.decisive,
            floor=floor,
            resamples=promotion.resamples,
            seed=promotion.seed,
        )
        promoted, reasons, gate_passed = decision.promote, list(decision.reasons), decision.promote
        comparisons = decision.comparisons
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
            body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
            object_store.put_bytes(champion_history_key(manifest["promoted_at"], challenger.train_id), body)
            # Last: a server polling current.json sees the new champion only once its history is kept.
            object_store.put_bytes(CHAMPION_CURRENT, body)
    readable, problems, now = _champion_is_readable(object_store)
    metrics = {}
    for name, scores in ((now or {}).get("metrics") or {}).items():
        for metric, value in scores.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"champion_{metric}_{name}"] = float(value)
            elif metric.endswith("_ci") and isinstance(value, list) and len(value) == 2:
                metrics[f"champion_{metric.removesuffix('_ci')}_{name}_low"] = float(value[0])
                metrics[f"champion_{metric.removesuffix('_ci')}_{name}_high"] = float(value[1])
    choice_lines = [f"- {reason}" for reason in choice.reasons]
    tests = [
        (
            c.test_set + (" (decisive)" if c.decisive else ""),
            f"{c.challenger:.4f}" if c.challenger is not None else "–",
            f"{c.reference:.4f}" if c.reference is not None else "–",
            (
                f"{100 * c.paired['difference']['estimate']:+.1f} [{100 * c.paired['difference']['low']:+.1f}, "
                f"{100 * c.paired['difference']['high']:+.1f}] pts"
            )
            if c.paired
            else "–",
            f"{c.paired['test']} p={c.paired['p_value']:.3g}" if c.paired else "–",
            c.paired["verdict"] if c.paired else "–",
            "passed" if c.passed else "not passed",
        )
        for c in comparisons
    ]
    return dg.MaterializeResult(
        metadata={
            "decision": decision_text,
            "promoted": promoted,
            "challenger_size": challenger.size_key,
            "challenger_variant": challenger.variant,
            "challenger_train_id": challenger.train_id,
            "best_size": choice.best.size_key,
            "best_variant": choice.best.variant,
            "tied_with_best": ", ".join(c.name for c in choice.tied),
            "challenger_choice": dg.MetadataValue.md("\n".join(choice_lines)),
            "champion_size": (now or {}).get("train_size", "none"),
            "champion_variant": (now or {}).get("variant", BASE_VARIANT if now else "none"),
            "champion_train_id": (now or {}).get("train_id", "none"),
            "compare_to": config.compare_to,
            "margin": float(config.margin),
            "alpha": float(alpha),
            "decisive_test_sets": ", ".join(promotion.decisive),
            "reasons": dg.MetadataValue.md("\n".join(f"- {reason}" for reason in reasons)),
            **(
                {
                    "paired_tests": dg.MetadataValue.md(
                        markdown_table(
                            tests,
                            ["test set", "challenger", "reference", "difference (95%)", "test", "verdict", "gate"],
                        )
                    )
                }
                if tests
                else {}
            ),
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
                    "challenger": challenger.name,
                    "compare_to": config.compare_to,
                    "margin": float(config.margin),
                    "alpha": float(alpha),
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
    return [with_gold(read_labelled(frozen.table(pointer, name, scratch), name), gold) for name in TEST_SETS]


def _read_champion(store: ObjectStore) -> dict[str, Any] | None:
    return read_pointer(store, CHAMPION_CURRENT)


def _champion_predictions(
    context: dg.AssetExecutionContext,
    store: ObjectStore,
    loaded: Task,
    trainer: TrainerResource,
    current: dict[str, Any] | None,
    by_id: dict[str, Evaluated],
) -> dict[str, Any] | None:
    """The champion's predictions on every row of the test sets in use: from a current report of
    the same adapter, or measured again (its report was replaced, or the test sets rebuilt)."""
    if current is None:
        return None
    if current["train_id"] in by_id:
        entry = by_id[current["train_id"]]
        return {name: entry.student(name) for name in entry.rows}
    context.log.info(f"re-measuring the champion {current['train_id']} on the test sets in use")
    frozen = upstream(context, store, TestSets)
    pointer = _require_test_sets(frozen)
    import numpy as np

    with scratch_dir(context) as scratch:
        adapter_dir = fetch_adapter(store, current["adapter_prefix"], scratch / "champion")
        tests = frozen_test_sets(store, frozen, pointer, scratch)
        with trainer.inference_device(context.log.info) as device:
            student = student_predictor(load_adapter_student(adapter_dir, device=device, log=context.log.info))
            return {test.name: np.asarray(student(test.texts).labels, dtype=np.int64) for test in tests}


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
    files = manifest["files"]
    required = (
        FULL_MODEL_REQUIRED_FILES
        if "adapter/adapter_config.json" not in files and "adapter/config.json" in files
        else ADAPTER_REQUIRED_FILES
    )
    missing = [name for name in required if name not in files]
    return not missing, [f"the adapter lacks {name}" for name in missing], current
