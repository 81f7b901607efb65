"""Re-distillation on a cadence: the configured size retrained, evaluated and put through the gate."""

import dagster as dg

from distill_pipeline.defs.core.resources import location_task
from distill_pipeline.defs.monitoring.jobs import TRIGGER_TAG, redistill_job, retrain_partition_key


@dg.schedule(
    name="redistill_schedule",
    cron_schedule=location_task().monitoring.retrain_cron,
    execution_timezone="UTC",
    job=redistill_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Retrain the configured size on the data gathered so far, evaluate it and run the promotion gate "
    "([monitoring] retrain_cron and retrain_size of the task).",
)
def redistill_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    tick = context.scheduled_execution_time.isoformat()
    # One run per tick, even if the tick is evaluated twice.
    return dg.RunRequest(
        run_key=f"redistill-{tick}", partition_key=retrain_partition_key(), tags={TRIGGER_TAG: "schedule"}
    )
