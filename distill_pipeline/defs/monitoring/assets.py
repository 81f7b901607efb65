"""The daily drift report: fresh traffic against the champion's training data, and the shadow champion."""

import hashlib
from pathlib import Path
from typing import Any

import dagster as dg

from distill_pipeline.core.layout import drift_report_prefix
from distill_pipeline.core.published import Champion, CuratedExamples, LoraAdapters, RawLogs, TeacherLabels, TrainSets
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.tables import (
    MissingTableError,
    publish_report,
    read_report,
)
from distill_pipeline.core.task import MonitoringConfig, Task
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.partitions import log_days
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.core.upstream import upstream
from distill_pipeline.defs.data.curation import curated_examples
from distill_pipeline.defs.data.ingest import raw_logs
from distill_pipeline.defs.data.splits import train_sets
from distill_pipeline.defs.teachers.labelling import teacher_labels
from distill_pipeline.logs.freshness import recent_days
from distill_pipeline.monitoring import drift
from distill_pipeline.students.adapters import fetch_adapter
from distill_pipeline.students.predict import load_adapter_student, student_predictor

INPUT_DRIFT_CHECK = "input_drift"
OUTPUT_DRIFT_CHECK = "output_drift"
SHADOW_AGREEMENT_CHECK = "shadow_agreement"
CHECK_SIGNALS = {
    INPUT_DRIFT_CHECK: (drift.LENGTH_PSI, drift.OOV_INCREASE, drift.EMBEDDING_MMD),
    OUTPUT_DRIFT_CHECK: (drift.LABEL_RATE_SHIFT,),
    SHADOW_AGREEMENT_CHECK: (drift.AGREEMENT_DROP,),
}
# The test set whose agreement with the teacher the shadow champion is held against.
SHADOW_REFERENCE_TEST_SET = "in_distribution"


AC = dg.AutomationCondition

#: The drift report of a day follows that day's ingestion only: a new champion must not make every
#: day since the first recompute at once (re-materialise chosen days from the UI for that).
_DAY_INPUTS = dg.AssetSelection.assets("raw_logs", "teacher_labels")
DRIFT_REPORT_CONDITION = (
    AC.any_deps_updated().allow(_DAY_INPUTS).since_last_handled()
    & ~AC.any_deps_missing().allow(_DAY_INPUTS)
    & ~AC.any_deps_in_progress().allow(_DAY_INPUTS)
    & ~AC.in_progress()
    & AC.all_deps_blocking_checks_passed().allow(_DAY_INPUTS)
).with_label("after_the_day_is_labelled")


@dg.asset(
    deps=[
        raw_logs,
        teacher_labels,
        dg.AssetKey("champion"),
        # The reference a day is compared with: the champion's training set and adapter, or the
        # curated pool before a champion exists.
        dg.AssetDep(train_sets, partition_mapping=dg.AllPartitionMapping()),
        dg.AssetDep(dg.AssetKey("lora_adapter"), partition_mapping=dg.AllPartitionMapping()),
        curated_examples,
    ],
    partitions_def=log_days,
    group_name="monitoring",
    kinds={"pytorch", "matplotlib"},
    automation_condition=DRIFT_REPORT_CONDITION,
    check_specs=[
        dg.AssetCheckSpec(
            INPUT_DRIFT_CHECK,
            asset="drift_report",
            description="Input lengths, vocabulary and embeddings of the day stay close to the champion's training data.",
        ),
        dg.AssetCheckSpec(
            OUTPUT_DRIFT_CHECK,
            asset="drift_report",
            description="The teacher's label rate on the day stays close to the training data's.",
        ),
        dg.AssetCheckSpec(
            SHADOW_AGREEMENT_CHECK,
            asset="drift_report",
            description="The champion agrees with the teacher on the day's traffic about as well as on its test set.",
        ),
    ],
)
def drift_report(context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource) -> dg.MaterializeResult:
    """A day's traffic against the champion's training data: input and output drift, shadow agreement, feedback."""
    day = context.partition_key
    object_store = store.open()
    loaded = task.load()
    config = loaded.monitoring
    # One seed per day: re-materialising a day samples the same rows.
    seed = int(hashlib.sha256(day.encode()).hexdigest()[:8], 16)
    with scratch_dir(context) as scratch:
        try:
            labels_path = upstream(context, object_store, TeacherLabels).labels(day, scratch)
            records_path = upstream(context, object_store, RawLogs).records(day, scratch)
        except MissingTableError as exc:
            raise dg.Failure(f"{exc}: materialise raw_logs and teacher_labels for {day} first") from exc
        current = _read_columns(labels_path, ("request_id", "input", "label"))
        champion = upstream(context, object_store, Champion).current()
        reference_name, reference_path = _reference_table(context, object_store, champion, scratch)
        reference = _read_columns(reference_path, ("request_id", "input", "label")) if reference_path else _empty()
        # Rows of the day that made it into the reference would hide their own drift.
        day_ids = set(current["request_id"])
        keep = [i for i, rid in enumerate(reference["request_id"]) if rid not in day_ids]
        reference = {name: [values[i] for i in keep] for name, values in reference.items()}

        report = drift.DriftReport(day, len(current["input"]), reference_name, len(reference["input"]))
        report.feedback = drift.feedback_rates(records_path)
        if len(current["input"]) >= 2 and len(reference["input"]) >= 2:
            _input_and_output_drift(context, report, loaded, current, reference, seed)
        else:
            report.notes.append("too few rows on the day or in the reference to compare distributions")
        if champion is not None and current["input"]:
            report.shadow = _shadow_evaluation(context, object_store, champion, current, config, seed, scratch)
        elif champion is None:
            report.notes.append("no champion yet: no shadow evaluation")
        report.signals = drift.evaluate_signals(report, config)

    body = report.to_dict()
    prefix = drift_report_prefix(day)
    publish_report(
        object_store,
        prefix,
        body,
        drift.report_markdown(report),
        {"day": day, "reference": reference_name, "champion_train_id": (champion or {}).get("train_id")},
    )
    history = _history(object_store, day)
    by_name = {signal.name: signal for signal in report.signals}
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": report.rows,
            "drifting": report.drifting,
            "fired_signals": ", ".join(s.name for s in report.fired()) or "none",
            "reference": reference_name,
            "reference_rows": report.reference_rows,
            **_numbers(report),
            "signals": dg.MetadataValue.json(
                {
                    s.name: {"value": s.value, "threshold": s.threshold, "fired": s.fired, "detail": s.detail}
                    for s in report.signals
                }
            ),
            "summary": dg.MetadataValue.md(drift.report_markdown(report)),
            "signals_over_time": dg.MetadataValue.md(drift.signal_history_markdown(history)),
            "feedback_over_time": dg.MetadataValue.md(drift.feedback_history_markdown(history)),
            "report": location(object_store, prefix + "report.md"),
        },
        check_results=[
            _check_result(name, [by_name[n] for n in signals if n in by_name])
            for name, signals in CHECK_SIGNALS.items()
        ],
    )


def _input_and_output_drift(
    context: dg.AssetExecutionContext,
    report: drift.DriftReport,
    task: Task,
    current: dict[str, list[Any]],
    reference: dict[str, list[Any]],
    seed: int,
) -> None:
    config = task.monitoring
    day_texts = drift.seeded_sample(current["input"], config.sample_rows, seed)
    reference_texts = drift.seeded_sample(reference["input"], config.sample_rows, seed + 1)
    report.length = drift.length_drift(reference_texts, day_texts)
    report.vocabulary = drift.vocabulary_drift(reference_texts, day_texts)
    if task.label.positive is not None:
        report.label_rate = drift.label_rate_drift(reference["label"], current["label"], task.label.positive)
    # The same frozen encoder for every day, whichever student is champion.
    encoder = task.student.base_model if task.student.student_kind == "encoder" else None
    x_texts = reference_texts[: config.embedding_rows]
    y_texts = day_texts[: config.embedding_rows]
    context.log.info(f"embedding {len(x_texts)} reference and {len(y_texts)} fresh texts")
    embeddings = drift.embed_texts([*x_texts, *y_texts], encoder)
    report.embedding = drift.mmd_permutation_test(
        embeddings[: len(x_texts)], embeddings[len(x_texts) :], permutations=config.permutations, seed=seed
    )


def _shadow_evaluation(
    context: dg.AssetExecutionContext,
    store: ObjectStore,
    champion: dict[str, Any],
    current: dict[str, list[Any]],
    config: MonitoringConfig,
    seed: int,
    scratch: Path,
) -> drift.ShadowEvaluation:
    rows = drift.seeded_sample(list(zip(current["input"], current["label"], strict=True)), config.shadow_rows, seed + 2)
    adapter_dir = fetch_adapter(store, champion["adapter_prefix"], scratch / "champion")
    predict = student_predictor(load_adapter_student(adapter_dir, log=context.log.info))
    metrics = (champion.get("metrics") or {}).get(SHADOW_REFERENCE_TEST_SET) or {}
    reference_agreement = metrics.get("agreement", metrics.get("accuracy"))
    context.log.info(f"shadow evaluation of champion {champion['train_id']} on {len(rows)} logged inputs")
    return drift.shadow_evaluation(
        lambda texts: predict(texts).labels,
        [text for text, _ in rows],
        [label for _, label in rows],
        reference_agreement=reference_agreement,
        champion_train_id=champion["train_id"],
    )


def _reference_table(
    context: dg.AssetExecutionContext, store: ObjectStore, champion: dict[str, Any] | None, scratch: Path
) -> tuple[str, Path | None]:
    """The champion's training set, else (before any champion) the curated pool, else nothing."""
    if champion is not None:
        size = champion["train_size"]
        train_sets_table = upstream(context, store, TrainSets)
        manifest = train_sets_table.manifest(size)
        adapter = upstream(context, store, LoraAdapters).manifest(champion["adapter_prefix"]) or {}
        if manifest is not None:
            exact = manifest["files"]["train.parquet"]["sha256"] == adapter.get("train_sha256")
            if not exact:
                context.log.warning(
                    f"train_sets {size} has changed since the champion trained on it: comparing with the current one"
                )
            name = f"champion training set ({size}{'' if exact else ', rebuilt since'})"
            return name, train_sets_table.train(size, scratch)
    pool = upstream(context, store, CuratedExamples)
    if pool.manifest() is not None:
        return "curated_examples (no champion yet)", pool.examples(scratch)
    return "nothing (no champion and no curated examples yet)", None


def _read_columns(path: Path, columns: tuple[str, ...]) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(columns))
    return {name: table.column(name).to_pylist() for name in columns}


def _empty() -> dict[str, list[Any]]:
    return {"request_id": [], "input": [], "label": []}


def _history(store: ObjectStore, day: str) -> list[dict[str, Any]]:
    """Published drift reports of the days up to ``day`` (at most HISTORY_DAYS of them), oldest first."""
    reports = [read_report(store, drift_report_prefix(d)) for d in recent_days(drift.HISTORY_DAYS, until=day)]
    return [r for r in reports if r is not None]


def _numbers(report: drift.DriftReport) -> dict[str, float]:
    """The statistics as floats, so the UI plots each over the partitions."""
    numbers: dict[str, float] = {}
    if report.length:
        numbers |= {"length_psi": report.length.psi, "length_ks_statistic": report.length.ks_statistic}
    if report.vocabulary:
        numbers |= {"oov_rate": report.vocabulary.oov_rate, "oov_rate_increase": report.vocabulary.increase}
    if report.embedding:
        numbers |= {"embedding_mmd2": report.embedding.mmd2, "embedding_p_value": report.embedding.p_value}
    if report.label_rate:
        numbers |= {
            "teacher_positive_rate": report.label_rate.current_rate,
            "label_rate_shift": report.label_rate.shift,
        }
    if report.shadow:
        numbers |= {"shadow_agreement": report.shadow.agreement, "shadow_cohen_kappa": report.shadow.cohen_kappa}
    for rates in report.feedback:
        model = rates.model.replace("/", "_")
        numbers |= {
            f"thumbs_down_rate_{model}": rates.thumbs_down_rate,
            f"regenerate_rate_{model}": rates.regenerate_rate,
        }
    return {name: float(value) for name, value in numbers.items()}


def _check_result(name: str, signals: list[drift.DriftSignal]) -> dg.AssetCheckResult:
    fired = [s for s in signals if s.fired]
    return dg.AssetCheckResult(
        check_name=name,
        passed=not fired,
        severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(f"{s.name} {s.value:.4f} > {s.threshold:.4f}" for s in fired) or "within thresholds",
        metadata={s.name: float(s.value) if s.value is not None else "n/a" for s in signals},
    )
