"""Partitions, defined once: log days, training-set sizes, and student variants from the task configuration."""

import os

import dagster as dg

from distill_pipeline.core.task import BASE_VARIANT
from distill_pipeline.data.splitting import TrainSize
from distill_pipeline.defs.core.resources import location_task

#: The first day of logs the pipeline knows about (``DISTILL_FIRST_DAY``).
FIRST_DAY = os.environ.get("DISTILL_FIRST_DAY", "2024-01-01")

# end_offset=1: today's logs form a partition while they are still arriving.
log_days = dg.DailyPartitionsDefinition(start_date=FIRST_DAY, end_offset=1)

train_sizes = dg.StaticPartitionsDefinition([TrainSize.parse(s).key for s in location_task().splits.train_sizes])

#: The dimensions of a student partition: which training set, which variant of the student.
SIZE, VARIANT = "size", "variant"
student_variants = dg.StaticPartitionsDefinition(list(location_task().variants))
#: Students are trained and evaluated per training-set size and per variant (base first). An
#: asset of these partitions that depends on a size-partitioned one (train_sets) reads the
#: partition of its own size: Dagster infers a MultiToSingleDimensionPartitionMapping on the
#: shared ``size`` dimension, so no mapping is written out.
sizes_and_variants = dg.MultiPartitionsDefinition({SIZE: train_sizes, VARIANT: student_variants})


def student_partition(size: str, variant: str = BASE_VARIANT) -> dg.MultiPartitionKey:
    """The partition key of one size and variant, as a run or the UI names it (``100pct|base``)."""
    return dg.MultiPartitionKey({SIZE: size, VARIANT: variant})


def size_and_variant(key: str) -> tuple[str, str]:
    """The size and variant of a student partition key."""
    dimensions = sizes_and_variants.get_partition_key_from_str(str(key)).keys_by_dimension
    return dimensions[SIZE], dimensions[VARIANT]
