"""Where each stage's output lives in the store: one stable layout for local and S3 stores.

Each table is one Parquet object beside a small JSON manifest written after it, so a reader that
sees the manifest sees a complete table (the manifest is the publish step).
"""

from __future__ import annotations

from distill_pipeline.core.task import BASE_VARIANT

TABLES = "tables"


def raw_logs_prefix(day: str) -> str:
    return f"{TABLES}/raw_logs/dt={day}/"


def raw_logs_shard_prefix(day: str, run_id: str, shard: int) -> str:
    """Where one shard of a day's ingestion stages its tables until the run merges them."""
    return f"staging/raw_logs/dt={day}/run={run_id}/shard-{shard:03d}/"


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


STUDENTS_ROOT = "students/"


def adapter_prefix(size_key: str, train_id: str) -> str:
    """One trained adapter: adapter/ (PEFT files, tokenizer, student.json) and the run's records.

    ``train_id`` names the spec and the data it was trained on, so a published adapter is never
    overwritten by a different one and a champion manifest can point at it for good.
    """
    return f"{STUDENTS_ROOT}adapters/size={size_key}/{train_id}/"


def adapter_pointer(size_key: str, variant: str = BASE_VARIANT) -> str:
    """The adapter a size x variant partition currently has; written after the adapter's manifest.

    The base variant keeps the size's own ``current.json``; another variant's pointer lies in a
    ``variant=NAME/`` folder beside it. Adapters themselves need no variant in their path: the
    train id already names the settings they were trained with.
    """
    folder = f"{STUDENTS_ROOT}adapters/size={size_key}/"
    return folder + ("" if variant == BASE_VARIANT else f"variant={variant}/") + "current.json"


REPORTS = "reports"
EVAL_REPORTS_ROOT = f"{REPORTS}/eval_report/"


def eval_report_prefix(size_key: str, variant: str = BASE_VARIANT) -> str:
    """The base variant's report is the size's; another variant's lies in ``variant=NAME/`` under it."""
    prefix = f"{EVAL_REPORTS_ROOT}size={size_key}/"
    return prefix if variant == BASE_VARIANT else f"{prefix}variant={variant}/"


ABLATION_PREFIX = f"{REPORTS}/ablation_report/"
EXPERIMENTS_PREFIX = f"{REPORTS}/experiments_report/"
TEACHER_EVAL_PREFIX = f"{REPORTS}/teacher_eval/"
#: Teacher-written inputs (synthetic_examples), kept apart from the logged ones.
SYNTHETIC_PREFIX = f"{TABLES}/synthetic_examples/"
#: Human labels for teacher evaluation: ``input``, ``gold_label`` and optionally ``test_set``.
GOLD_LABELS = "gold/labels.parquet"
#: Every paid teacher answer (see ledger.py); segments are JSONL, one per run and rotation.
LEDGER_ROOT = "ledger/"
CHAMPION_ROOT = "champion/"
#: The promoted student, as a small JSON manifest a server reads; moves only on promotion.
CHAMPION_CURRENT = f"{CHAMPION_ROOT}current.json"


def champion_history_key(promoted_at: str, train_id: str) -> str:
    stamp = promoted_at.replace(":", "").replace("-", "").split(".")[0]
    return f"{CHAMPION_ROOT}history/{stamp}-{train_id}.json"


MANIFEST = "_manifest.json"

DRIFT_REPORTS_ROOT = f"{REPORTS}/drift_report/"


def drift_report_prefix(day: str) -> str:
    return f"{DRIFT_REPORTS_ROOT}dt={day}/"


def ab_report_prefix(day: str) -> str:
    """The feedback A/B report of one day's calls (the teacher against each served student)."""
    return f"{REPORTS}/ab_report/dt={day}/"
