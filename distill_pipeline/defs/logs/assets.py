"""The teacher's log objects: written by applications, not by the pipeline; the graph starts here."""

import dagster as dg

from distill_pipeline.defs.core.partitions import log_days
from distill_pipeline.logs.schema import SCHEMA_VERSION

teacher_logs = dg.AssetSpec(
    "teacher_logs",
    description="Teacher request/response log objects (JSONL, one per batch) that applications write to the store.",
    group_name="logs",
    kinds={"s3", "json"},
    partitions_def=log_days,
    metadata={"schema_version": SCHEMA_VERSION, "layout": "logs/dt=YYYY-MM-DD/<writer>-<batch>.jsonl[.gz]"},
)
