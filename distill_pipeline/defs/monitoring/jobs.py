"""The re-distillation job: the configured size's training set, student, evaluation and the promotion gate."""

import dagster as dg

from distill_pipeline.core.task import TaskConfigError
from distill_pipeline.data.splitting import TrainSize
from distill_pipeline.defs.core.partitions import train_sizes
from distill_pipeline.defs.core.resources import location_task

REDISTILL_JOB = "redistill_job"
#: Tags every retraining run carries, so the UI can filter them and say why each one ran.
TRIGGER_TAG = "distill/trigger"
DRIFT_SIGNAL_TAG = "distill/drift_signal"
DRIFT_VALUE_TAG = "distill/drift_value"
DRIFT_THRESHOLD_TAG = "distill/drift_threshold"
DRIFT_DAY_TAG = "distill/drift_day"


def retrain_size_key() -> str:
    """The size partition re-distillation trains (``[monitoring] retrain_size`` of the task)."""
    key = TrainSize.parse(location_task().monitoring.retrain_size).key
    if key not in train_sizes.get_partition_keys():
        raise TaskConfigError(
            f"monitoring.retrain_size {key!r} is not one of the task's training sizes {train_sizes.get_partition_keys()}"
        )
    return key


redistill_job = dg.define_asset_job(
    REDISTILL_JOB,
    selection=dg.AssetSelection.assets("train_sets", "lora_adapter", "eval_report", "champion"),
    description="Rebuild one size's training set from the data gathered so far, train and evaluate its student, "
    "and run the promotion gate.",
)
