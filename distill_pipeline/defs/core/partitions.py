"""Partitions, defined once: log days, and training-set sizes from the task configuration."""

import os

import dagster as dg

from distill_pipeline.data.splitting import TrainSize
from distill_pipeline.defs.core.resources import location_task

#: The first day of logs the pipeline knows about (``DISTILL_FIRST_DAY``).
FIRST_DAY = os.environ.get("DISTILL_FIRST_DAY", "2024-01-01")

# end_offset=1: today's logs form a partition while they are still arriving.
log_days = dg.DailyPartitionsDefinition(start_date=FIRST_DAY, end_offset=1)

train_sizes = dg.StaticPartitionsDefinition([TrainSize.parse(s).key for s in location_task().splits.train_sizes])
