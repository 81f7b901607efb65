"""Sensors that keep the student current: the data stages by automation, drift into retraining."""

import json

import dagster as dg

from distill_pipeline.defs.core.resources import location_task
from distill_pipeline.defs.data.curation import curated_examples
from distill_pipeline.defs.data.splits import test_sets, train_sets
from distill_pipeline.defs.monitoring.assets import ab_report, drift_report
from distill_pipeline.defs.monitoring.jobs import (
    DRIFT_DAY_TAG,
    DRIFT_SIGNAL_TAG,
    DRIFT_THRESHOLD_TAG,
    DRIFT_VALUE_TAG,
    TRIGGER_TAG,
    redistill_job,
    retrain_partition_key,
)
from distill_pipeline.monitoring import drift

INTERVAL_S = location_task().monitoring.sensor_interval_s
# Drift reports read per tick; more wait for the next tick, in order.
DRIFT_REPORTS_PER_TICK = 500


#: Evaluates the automation conditions of the stages that follow ingestion.
data_automation_sensor = dg.AutomationConditionSensorDefinition(
    "data_automation_sensor",
    target=dg.AssetSelection.assets(curated_examples, test_sets, train_sets, drift_report, ab_report),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=INTERVAL_S,
    description="Curation, test and training sets, drift and A/B reports follow new logs and labels by themselves.",
)


@dg.sensor(
    name="drift_retraining_sensor",
    job=redistill_job,
    minimum_interval_seconds=INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches re-distillation once per drift event (a stretch of drifting drift reports, live "
    "agreement on served traffic included), with the signal that fired and its value in the run's tags.",
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
        partition_key=retrain_partition_key(),
        tags={
            TRIGGER_TAG: "drift",
            DRIFT_SIGNAL_TAG: event.signal,
            DRIFT_VALUE_TAG: f"{event.value:.6g}",
            DRIFT_THRESHOLD_TAG: f"{event.threshold:.6g}",
            DRIFT_DAY_TAG: event.day,
        },
    )
    return dg.SensorResult(run_requests=[request], cursor=cursor)
