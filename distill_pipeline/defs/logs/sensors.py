"""Fresh log objects under ``logs/dt=DAY/`` into ingestion runs of that day's partition."""

import dagster as dg

from distill_pipeline.core.layout import raw_logs_prefix
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.tables import read_manifest
from distill_pipeline.core.task import load_task
from distill_pipeline.defs.core.partitions import FIRST_DAY, log_days
from distill_pipeline.defs.core.resources import StoreResource
from distill_pipeline.defs.data.ingest import raw_logs
from distill_pipeline.defs.monitoring.jobs import TRIGGER_TAG
from distill_pipeline.defs.teachers.labelling import teacher_labels
from distill_pipeline.logs.freshness import scan_for_fresh_days
from distill_pipeline.logs.schema import LOG_PREFIX

INTERVAL_S = load_task().monitoring.sensor_interval_s


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
