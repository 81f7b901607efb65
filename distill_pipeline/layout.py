"""Where each stage's output lives in the store: one stable layout for local and S3 stores.

Each table is one Parquet object beside a small JSON manifest written after it, so a reader that
sees the manifest sees a complete table (the manifest is the publish step).
"""

from __future__ import annotations

TABLES = "tables"


def raw_logs_prefix(day: str) -> str:
    return f"{TABLES}/raw_logs/dt={day}/"


def teacher_labels_prefix(day: str) -> str:
    return f"{TABLES}/teacher_labels/dt={day}/"


TEACHER_LABELS_ROOT = f"{TABLES}/teacher_labels/"
CURATED_PREFIX = f"{TABLES}/curated_examples/"
TEST_SETS_ROOT = "test_sets/"
#: Points at the frozen test-set version every run uses; written last when a version is made.
TEST_SETS_CURRENT = f"{TEST_SETS_ROOT}current.json"


def test_sets_prefix(version: int) -> str:
    return f"{TEST_SETS_ROOT}v{version:04d}/"


def train_set_prefix(size_key: str) -> str:
    return f"{TABLES}/train_sets/size={size_key}/"


MANIFEST = "_manifest.json"
