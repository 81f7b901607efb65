"""Sensors: fresh log objects into ingestion runs, the data stages by automation, drift into retraining."""

import json

import dagster as dg

from distill_pipeline import drift
from distill_pipeline.defs.curation.assets import curated_examples
from distill_pipeline.defs.ingest.assets import raw_logs, teacher_labels
from distill_pipeline.defs.monitoring.assets import drift_report
from distill_pipeline.defs.monitoring.jobs import (
    DRIFT_DAY_TAG,
    DRIFT_SIGNAL_TAG,
    DRIFT_THRESHOLD_TAG,
    DRIFT_VALUE_TAG,
    TRIGGER_TAG,
    redistill_job,
    retrain_size_key,
)
from distill_pipeline.defs.partitions import FIRST_DAY, log_days
from distill_pipeline.defs.resources import StoreResource
from distill_pipeline.defs.splits.assets import test_sets, train_sets
from distill_pipeline.freshness import scan_for_fresh_days
from distill_pipeline.layout import raw_logs_prefix
from distill_pipeline.logschema import LOG_PREFIX
from distill_pipeline.store import ObjectStore
from distill_pipeline.tables import read_manifest
from distill_pipeline.task import load_task

INTERVAL_S = load_task().monitoring.sensor_interval_s
# Drift reports read per tick; more wait for the next tick, in order.
DRIFT_REPORTS_PER_TICK = 500


@dg.sensor(
    name="fresh_logs_sensor",
    target=dg.AssetSelection.assets(raw_logs, teacher_labels),
    minimum_interval_seconds=INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns new or rewritten log objects under logs/dt=DAY/ into ingestion runs of that day's partition.",
)
def fresh_logs_sensor(context: dg.SensorEvaluationContext, store: StoreResource) -> dg.SensorResult:
    object_store = store.open()
    last_day = log_days.get_last_partition_key()
    scan = scan_for_fresh_days(
        object_store.list(f"{LOG_PREFIX}/"), context.cursor, first_day=FIRST_DAY, last_day=last_day or FIRST_DAY
    )
    if scan.skipped_days:
        context.log.warning(
            f"log objects for days outside the partitions [{FIRST_DAY}, {last_day}] wait: {scan.skipped_days[:5]}"
        )
    requests = []
    for fresh in scan.fresh:
        if fresh.first_seen and _already_ingested(object_store, fresh.day, fresh.keys):
            # A first look at a store ingested before (a new sensor, a lost cursor): nothing new.
            continue
        context.log.info(f"{fresh.day}: {fresh.new_objects} new of {fresh.objects} log objects")
        requests.append(
            dg.RunRequest(
                run_key=fresh.run_key,
                partition_key=fresh.day,
                tags={TRIGGER_TAG: "fresh_logs", "distill/log_objects": str(fresh.objects)},
            )
        )
    return dg.SensorResult(run_requests=requests, cursor=scan.cursor)


def _already_ingested(store: ObjectStore, day: str, keys: frozenset[str]) -> bool:
    manifest = read_manifest(store, raw_logs_prefix(day))
    return manifest is not None and set(manifest.get("objects", [])) == set(keys)


#: Evaluates the automation conditions of the stages that follow ingestion.
data_automation_sensor = dg.AutomationConditionSensorDefinition(
    "data_automation_sensor",
    target=dg.AssetSelection.assets(curated_examples, test_sets, train_sets, drift_report),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=INTERVAL_S,
    description="Curation, test and training sets, and drift reports follow new labels by themselves.",
)


@dg.sensor(
    name="drift_retraining_sensor",
    job=redistill_job,
    minimum_interval_seconds=INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches re-distillation once per drift event (a stretch of drifting drift reports), "
    "with the signal that fired and its value in the run's tags.",
)
def drift_retraining_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    state = json.loads(context.cursor) if context.cursor else {"after": None, "open": False}
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=drift_report.key, after_storage_id=state["after"]),
        limit=DRIFT_REPORTS_PER_TICK,
        ascending=True,
    ).records
    if not records:
        return dg.SkipReason("no new drift reports")
    observed = []
    for record in records:
        materialization = record.asset_materialization
        metadata = {key: value.value for key, value in (materialization.metadata if materialization else {}).items()}
        day = (materialization.partition if materialization else None) or "unknown"
        observed.append(drift.ObservedReport(record.storage_id, day, drift.signals_from_metadata(metadata)))
    event, still_open = drift.next_drift_event(bool(state["open"]), observed)
    cursor = json.dumps({"after": records[-1].storage_id, "open": still_open})
    if event is None:
        return dg.SensorResult(cursor=cursor, skip_reason="no new drift event")
    context.log.info(f"drift on {event.day}: {event.signal} = {event.value:.4f} > {event.threshold:.4f}")
    request = dg.RunRequest(
        run_key=event.run_key,
        partition_key=retrain_size_key(),
        tags={
            TRIGGER_TAG: "drift",
            DRIFT_SIGNAL_TAG: event.signal,
            DRIFT_VALUE_TAG: f"{event.value:.6g}",
            DRIFT_THRESHOLD_TAG: f"{event.threshold:.6g}",
            DRIFT_DAY_TAG: event.day,
        },
    )
    return dg.SensorResult(run_requests=[request], cursor=cursor)
