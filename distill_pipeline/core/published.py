"""What each asset publishes, read one way: a typed accessor per asset over the store layout.

An asset reads an upstream only through that upstream's accessor (the Dagster layer checks the
upstream is a declared dependency), so the store path it reads is the one the upstream
publishes, and a layout change is made here once. Fan-in over partitions takes the partition keys
Dagster's partition mapping gives and keeps those that have been published; nothing lists the store
to find them.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from distill_pipeline.core import layout
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.tables import MissingTableError, fetch_table, read_manifest, read_pointer, read_report
from distill_pipeline.core.task import BASE_VARIANT

#: The per-row predictions an evaluation report publishes beside report.json.
PREDICTIONS_FILE = "predictions.parquet"
#: Manifests read at once when a fan-in checks which mapped partitions were published (S3 latency).
MANIFEST_READERS = 16


class Published:
    """The outputs of one asset in a store."""

    #: The asset whose outputs these are.
    ASSET: ClassVar[str]

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def _published(self, prefixes: dict[str, str]) -> list[str]:
        """The keys of ``prefixes`` (partition key -> prefix) whose manifest exists, in order."""
        with ThreadPoolExecutor(MANIFEST_READERS) as pool:
            found = list(pool.map(lambda prefix: read_manifest(self.store, prefix) is not None, prefixes.values()))
        return [key for key, exists in zip(prefixes, found, strict=True) if exists]


class RawLogs(Published):
    ASSET = "raw_logs"

    def manifest(self, day: str) -> dict[str, Any] | None:
        return read_manifest(self.store, layout.raw_logs_prefix(day))

    def records(self, day: str, directory: Path) -> Path:
        return fetch_table(self.store, layout.raw_logs_prefix(day), "records.parquet", directory)


class TeacherLabels(Published):
    ASSET = "teacher_labels"

    def labels(self, day: str, directory: Path) -> Path:
        return fetch_table(self.store, layout.teacher_labels_prefix(day), "labels.parquet", directory)

    def published_days(self, days: Sequence[str]) -> list[str]:
        """Those of ``days`` (the mapped partitions of a fan-in) that have labels."""
        return self._published({day: layout.teacher_labels_prefix(day) for day in days})


class CuratedExamples(Published):
    ASSET = "curated_examples"

    def manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.store, layout.CURATED_PREFIX)

    def examples(self, directory: Path) -> Path:
        return fetch_table(self.store, layout.CURATED_PREFIX, "examples.parquet", directory)


class TestSets(Published):
    """The frozen test sets: versions, and a pointer to the version every run uses."""

    ASSET = "test_sets"
    # Not a test class, whatever pytest's collector thinks of the name.
    __test__ = False

    def current(self) -> dict[str, Any] | None:
        """The pointer to the version in use (``version``, ``prefix``), or None before the first."""
        return read_pointer(self.store, layout.TEST_SETS_CURRENT)

    def manifest(self, version: int) -> dict[str, Any] | None:
        return read_manifest(self.store, layout.test_sets_prefix(version))

    def table(self, pointer: dict[str, Any], name: str, directory: Path) -> Path:
        """One test set (``in_distribution``, ``balanced``) of the version ``pointer`` names."""
        return fetch_table(self.store, pointer["prefix"], f"{name}.parquet", directory)

    def require_current(self) -> dict[str, Any]:
        pointer = self.current()
        if pointer is None:
            raise MissingTableError(f"no frozen test sets in {self.store.url} yet: materialise test_sets first")
        return pointer


class TrainSets(Published):
    ASSET = "train_sets"

    def manifest(self, size: str) -> dict[str, Any] | None:
        return read_manifest(self.store, layout.train_set_prefix(size))

    def train(self, size: str, directory: Path) -> Path:
        return fetch_table(self.store, layout.train_set_prefix(size), "train.parquet", directory)


class LoraAdapters(Published):
    ASSET = "lora_adapter"

    def current(self, size: str, variant: str = BASE_VARIANT) -> dict[str, Any] | None:
        """The size and variant's current adapter (``prefix``, ``train_id``), or None before one is trained."""
        return read_pointer(self.store, layout.adapter_pointer(size, variant))

    def manifest(self, prefix: str) -> dict[str, Any] | None:
        """The manifest of the adapter published under ``prefix`` (what it was trained on, its files)."""
        return read_manifest(self.store, prefix)


class EvalReports(Published):
    ASSET = "eval_report"

    def report(self, size: str, variant: str = BASE_VARIANT) -> dict[str, Any] | None:
        return read_report(self.store, layout.eval_report_prefix(size, variant))

    def predictions(self, size: str, variant: str, directory: Path) -> Path:
        """Every test row's label and each model's prediction (``predictions.parquet``), for paired tests."""
        return fetch_table(self.store, layout.eval_report_prefix(size, variant), PREDICTIONS_FILE, directory)


class Champion(Published):
    ASSET = "champion"

    def current(self) -> dict[str, Any] | None:
        """The promoted student's manifest (``champion/current.json``), or None before the first promotion."""
        return read_pointer(self.store, layout.CHAMPION_CURRENT)
