"""The re-distillation job: the configured size's training set, student, evaluation and the promotion gate."""

import dagster as dg

from distill_pipeline.core.task import TaskConfigError
from distill_pipeline.data.splitting import TrainSize
from distill_pipeline.defs.core.partitions import student_partition, train_sizes
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


def retrain_partition_key() -> str:
    """The student partition re-distillation trains: the configured size, base variant."""
    return student_partition(retrain_size_key())


# train_sets is not in the job: a run holds one partitions definition, and the training sets
# follow new curated data by declarative automation (EAGER_BEHIND_CHECKS) already.
redistill_job = dg.define_asset_job(
    REDISTILL_JOB,
    selection=dg.AssetSelection.assets("lora_adapter", "eval_report", "champion"),
    description="Train and evaluate the base student of one size on its training set as automation keeps it "
    "current, and run the promotion gate.",
)
