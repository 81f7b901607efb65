"""Fresh log objects under ``logs/dt=DAY/`` into ingestion runs of that day's partition."""


import dagster as dg

from distill_pipeline.core.published import RawLogs
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.defs.core.partitions import FIRST_DAY, log_days
from distill_pipeline.defs.core.resources import StoreResource, TaskResource, location_task
from distill_pipeline.defs.data.ingest import raw_logs
from distill_pipeline.defs.monitoring.jobs import TRIGGER_TAG
from distill_pipeline.defs.teachers.labelling import teacher_labels
from distill_pipeline.logs.freshness import recent_days, scan_for_fresh_days
from distill_pipeline.logs.schema import log_object_prefix

INTERVAL_S = location_task().monitoring.sensor_interval_s


@dg.sensor(
    name="fresh_logs_sensor",
    target=dg.AssetSelection.assets(raw_logs, teacher_labels),
    minimum_interval_seconds=INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns new or rewritten log objects under logs/dt=DAY/ of the most recent days (the task's "
    "monitoring.fresh_log_days) into ingestion runs of that day's partition.",
)
def fresh_logs_sensor(
    context: dg.SensorEvaluationContext, store: StoreResource, task: TaskResource
) -> dg.SensorResult:
    object_store = store.open()
    last_day = log_days.get_last_partition_key() or FIRST_DAY
    window = recent_days(task.load().monitoring.fresh_log_days, until=last_day, first_day=FIRST_DAY)
    listing = [info for day in window for info in object_store.list(log_object_prefix(day))]
    scan = scan_for_fresh_days(listing, context.cursor, first_day=window[0], last_day=last_day)
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
    manifest = RawLogs(store).manifest(day)
    return manifest is not None and set(manifest.get("objects", [])) == set(keys)
