"""The daily drift report: fresh traffic against the champion's training data, and the shadow champion."""

import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq

from distill_pipeline.core.layout import ab_report_prefix, drift_report_prefix
from distill_pipeline.core.published import Champion, CuratedExamples, LoraAdapters, RawLogs, TeacherLabels, TrainSets
from distill_pipeline.core.reporting import counts_table
from distill_pipeline.core.store import ObjectNotFound, ObjectStore
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
from distill_pipeline.defs.students.launchers import INFERENCE_OP_TAGS
from distill_pipeline.defs.students.resources import GPU_POOL, TrainerResource
from distill_pipeline.defs.teachers.labelling import teacher_labels
from distill_pipeline.logs.freshness import recent_days
from distill_pipeline.monitoring import drift, live
from distill_pipeline.monitoring.feedback import (
    ab_comparisons,
    ab_markdown,
    feedback_days,
    feedback_rates,
    rates_markdown,
    read_feedback,
)
from distill_pipeline.students.adapters import ADAPTER_DIR, fetch_adapter
from distill_pipeline.students.predict import load_adapter_student, student_predictor

INPUT_DRIFT_CHECK = "input_drift"
OUTPUT_DRIFT_CHECK = "output_drift"
SHADOW_AGREEMENT_CHECK = "shadow_agreement"
CHECK_SIGNALS = {
    INPUT_DRIFT_CHECK: (drift.LENGTH_PSI, drift.OOV_INCREASE, drift.EMBEDDING_MMD),
    OUTPUT_DRIFT_CHECK: (drift.LABEL_RATE_SHIFT,),
    SHADOW_AGREEMENT_CHECK: (drift.AGREEMENT_DROP, drift.LIVE_AGREEMENT_DROP),
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
    # The shadow evaluation runs the champion, on a GPU of its own where there is one.
    pool=GPU_POOL,
    op_tags=INFERENCE_OP_TAGS,
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
            description="The champion agrees with the teacher on the day's traffic about as well as on its test set "
            "(shadow evaluation, or live agreement on shadow and sample pairs of served traffic).",
        ),
    ],
)
def drift_report(
    context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource, trainer: TrainerResource
) -> dg.MaterializeResult:
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
        labelled = _read_columns(labels_path, ("request_id", "input", "label"))
        # Inputs need no teacher: every call of the day, the student-served ones too.
        day_ids, day_texts = live.day_inputs(records_path, loaded.id, scratch / "duckdb")
        current = {
            "request_id": day_ids,
            "input": day_texts,
            "label": live.labels_for_rates(records_path, labels_path, scratch / "duckdb"),
        }
        champion = upstream(context, object_store, Champion).current()
        reference_name, reference_path = _reference_table(context, object_store, champion, scratch)
        reference = _read_columns(reference_path, ("request_id", "input", "label")) if reference_path else _empty()
        # Rows of the day that made it into the reference would hide their own drift.
        day_id_set = set(day_ids)
        keep = [i for i, rid in enumerate(reference["request_id"]) if rid not in day_id_set]
        reference = {name: [values[i] for i in keep] for name, values in reference.items()}

        report = drift.DriftReport(day, len(day_texts), reference_name, len(reference["input"]))
        report.labelled_rows = len(current["label"])
        report.live = _live_report(context, object_store, loaded, champion, records_path, labels_path, seed, scratch)
        stream = read_feedback(object_store, feedback_days(day, config.feedback_lag_days))
        report.feedback = feedback_rates(records_path, stream.events)
        if len(day_texts) >= 2 and len(reference["input"]) >= 2:
            _input_and_output_drift(context, report, loaded, current, reference, seed)
        else:
            report.notes.append("too few rows on the day or in the reference to compare distributions")
        live_pairs = report.live.agreement_of((champion or {}).get("train_id"))
        if live_pairs is not None and live_pairs.pairs >= config.min_live_pairs:
            # The served champion's own answers on shadow and sample pairs already say what the
            # shadow evaluation would, without running the model again.
            report.notes.append(
                f"shadow evaluation replaced by live agreement on {live_pairs.pairs:,} shadow and sample pairs"
            )
        elif champion is not None and labelled["input"]:
            report.shadow = _shadow_evaluation(
                context, object_store, trainer, champion, labelled, config, seed, scratch
            )
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
            "live_agreement_over_time": dg.MetadataValue.md(drift.live_agreement_history_markdown(history)),
            "prior_over_time": dg.MetadataValue.md(drift.prior_history_markdown(history)),
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
    trainer: TrainerResource,
    champion: dict[str, Any],
    current: dict[str, list[Any]],
    config: MonitoringConfig,
    seed: int,
    scratch: Path,
) -> drift.ShadowEvaluation:
    rows = drift.seeded_sample(list(zip(current["input"], current["label"], strict=True)), config.shadow_rows, seed + 2)
    adapter_dir = fetch_adapter(store, champion["adapter_prefix"], scratch / "champion")
    metrics = (champion.get("metrics") or {}).get(SHADOW_REFERENCE_TEST_SET) or {}
    reference_agreement = metrics.get("agreement", metrics.get("accuracy"))
    with trainer.inference_device(context.log.info) as device:
        predict = student_predictor(load_adapter_student(adapter_dir, device=device, log=context.log.info))
        context.log.info(f"shadow evaluation of champion {champion['train_id']} on {len(rows)} logged inputs")
        return drift.shadow_evaluation(
            lambda texts: predict(texts).labels,
            [text for text, _ in rows],
            [label for _, label in rows],
            reference_agreement=reference_agreement,
            champion_train_id=champion["train_id"],
        )


def _live_report(
    context: dg.AssetExecutionContext,
    store: ObjectStore,
    task: Task,
    champion: dict[str, Any] | None,
    records_path: Path,
    labels_path: Path,
    seed: int,
    scratch: Path,
) -> live.LiveReport:
    """The day's served traffic, held to the champion's test-set agreement and training prior."""
    reference_agreement = train_prior = None
    if champion is not None:
        metrics = (champion.get("metrics") or {}).get(SHADOW_REFERENCE_TEST_SET) or {}
        reference_agreement = metrics.get("agreement", metrics.get("accuracy"))
        train_prior = _train_prior(context, store, champion)
    return live.live_report(
        records_path,
        labels_path,
        task.label.values,
        task.label.positive,
        scratch / "duckdb-live",
        champion_train_id=(champion or {}).get("train_id"),
        reference_agreement=reference_agreement,
        train_prior=train_prior,
        seed=seed,
    )


def _train_prior(context: dg.AssetExecutionContext, store: ObjectStore, champion: dict[str, Any]) -> float | None:
    """The share of positives the champion trained at, from its student.json (None: not recorded)."""
    from distill_pipeline.trainer.predict import STUDENT_FILE

    key = f"{champion['adapter_prefix']}{ADAPTER_DIR}/{STUDENT_FILE}"
    try:
        meta = json.loads(store.get_bytes(key, max_bytes=1 << 20))
    except (ObjectNotFound, ValueError) as exc:
        context.log.warning(f"no training prior for champion {champion.get('train_id')}: {exc}")
        return None
    prior = (meta.get("decision") or {}).get("train_prior") if isinstance(meta, dict) else None
    return None if prior is None else float(prior)


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
    if report.live is not None:
        live_report = report.live
        numbers["student_served_share"] = live_report.student_served_share
        for cell in live_report.agreement:
            numbers |= {
                f"live_agreement_{cell.train_id}": cell.rate,
                f"live_agreement_low_{cell.train_id}": cell.low,
                f"live_agreement_high_{cell.train_id}": cell.high,
            }
        for cell in live_report.deferred:
            numbers[f"deferred_agreement_biased_{cell.train_id}"] = cell.rate
        for share in live_report.traffic:
            numbers[f"calls_share_{share.call_kind}_{share.served_by}"] = share.share
        prior = live_report.prior
        if prior is not None:
            if prior.teacher_rate is not None:
                numbers |= {
                    "prior_teacher_rate": prior.teacher_rate.rate,
                    "prior_teacher_rate_low": prior.teacher_rate.low,
                    "prior_teacher_rate_high": prior.teacher_rate.high,
                }
            if prior.em_prior is not None:
                numbers["prior_em_estimate"] = prior.em_prior
            if prior.train_prior is not None:
                numbers["prior_champion_training"] = prior.train_prior
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


user_feedback = dg.AssetSpec(
    "user_feedback",
    description="End-user verdicts on earlier calls (thumbs up or down, regenerate), appended by the serving "
    "applications as FeedbackEvent lines and joined to calls by request id.",
    group_name="monitoring",
    kinds={"s3", "json"},
    metadata={"layout": "feedback/dt=YYYY-MM-DD/<writer>-<batch>.jsonl[.gz]"},
)

#: A day's A/B report follows that day's ingestion; re-materialise it to take in feedback that came later.
AB_REPORT_CONDITION = (
    AC.any_deps_updated().allow(dg.AssetSelection.assets("raw_logs")).since_last_handled()
    & ~AC.any_deps_missing().allow(dg.AssetSelection.assets("raw_logs"))
    & ~AC.any_deps_in_progress()
    & ~AC.in_progress()
    & AC.all_deps_blocking_checks_passed()
).with_label("after_the_day_is_ingested")


@dg.asset(
    deps=[raw_logs, user_feedback],
    partitions_def=log_days,
    group_name="monitoring",
    kinds={"duckdb", "json"},
    automation_condition=AB_REPORT_CONDITION,
)
def ab_report(context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource) -> dg.MaterializeResult:
    """Thumbs-down and regenerate rates per served model on a day's calls, each student tested against the teacher."""
    day = context.partition_key
    object_store = store.open()
    config = task.load().monitoring
    days = feedback_days(day, config.feedback_lag_days)
    with scratch_dir(context) as scratch:
        try:
            records_path = upstream(context, object_store, RawLogs).records(day, scratch)
        except MissingTableError as exc:
            raise dg.Failure(f"{exc}: materialise raw_logs for {day} first") from exc
        stream = read_feedback(object_store, days)
        rates = feedback_rates(records_path, stream.events)
        comparisons = ab_comparisons(rates)
        quarantine = scratch / "feedback_quarantine.parquet"
        pq.write_table(stream.quarantine, quarantine)
        markdown = "\n\n".join(
            [
                f"**{day}**: feedback on the day's calls from the inline `feedback` field and the feedback stream "
                f"of {days[0]} to {days[-1]} (95% Wilson intervals; Newcombe intervals and two-proportion z-tests "
                "for the differences; canary traffic is split by user, so calls of one user are not independent).",
                rates_markdown(rates),
                ab_markdown(comparisons),
            ]
        )
        body = {
            "day": day,
            "feedback_days": days,
            "rates": [r.to_dict() for r in rates],
            "comparisons": [c.to_dict() for c in comparisons],
            "stream": {
                "objects": stream.objects,
                "lines_in": stream.lines_in,
                "quarantined": stream.quarantined,
                "duplicates": stream.duplicates,
                "reasons": stream.reasons,
            },
        }
        prefix = ab_report_prefix(day)
        publish_report(
            object_store, prefix, body, markdown, {"day": day}, files={"feedback_quarantine.parquet": quarantine}
        )
    numbers: dict[str, float] = {}
    for r in rates:
        model = r.model.replace("/", "_")
        numbers |= {f"thumbs_down_rate_{model}": r.thumbs_down_rate, f"regenerate_rate_{model}": r.regenerate_rate}
    for c in comparisons:
        pair = f"{c.student}_vs_{c.teacher.replace('/', '_')}"
        numbers |= {
            f"thumbs_down_difference_{pair}": c.thumbs_down.difference,
            f"thumbs_down_p_value_{pair}": c.thumbs_down.p_value,
            f"regenerate_difference_{pair}": c.regenerate.difference,
            f"regenerate_p_value_{pair}": c.regenerate.p_value,
        }
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(r.calls for r in rates),
            **{name: float(value) for name, value in numbers.items()},
            "feedback_lines_in": stream.lines_in,
            "feedback_quarantined": stream.quarantined,
            "feedback_duplicates": stream.duplicates,
            "feedback_quarantine_reasons": dg.MetadataValue.md(
                counts_table(stream.reasons, "reason", stream.lines_in) if stream.reasons else "_none_"
            ),
            "summary": dg.MetadataValue.md(markdown),
            "report": location(object_store, prefix + "report.md"),
        }
    )
