"""The trainer's spec for a training set of the task, and the id a (spec, data) pair is known by."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from distill_pipeline.core.task import BASE_VARIANT, Task
from distill_pipeline.trainer.spec import TrainSpec

#: The trainer's command-line entry point, run as ``python -m TRAINER_MODULE --spec FILE``.
TRAINER_MODULE = "distill_pipeline.trainer.train"
TEXT_COLUMN = "input"
LABEL_COLUMN = "label"
#: The teacher's P(positive) in teacher_labels and the training sets (null: a hard label only).
SOFT_LABEL_COLUMN = "soft_label"


def build_train_spec(
    task: Task, train_path: str | Path, output_dir: str | Path, variant: str = BASE_VARIANT
) -> TrainSpec:
    """The TrainSpec for one of the task's student variants on one training-set file: its settings
    plus the run's own fields. A variant that weighs soft targets trains on the soft label column."""
    settings = task.variant(variant).settings
    two_labels = len(task.label.values) == 2
    return TrainSpec(
        **dataclasses.asdict(settings),
        soft_label_column=SOFT_LABEL_COLUMN if settings.soft_label_weight > 0 and two_labels else None,
        train_path=str(train_path),
        output_dir=str(output_dir),
        text_column=TEXT_COLUMN,
        label_column=LABEL_COLUMN,
        label_values=list(task.label.values),
        label_names=list(task.label.names),
        positive_label=task.label.positive if two_labels else None,
    )


def train_id(spec: TrainSpec, train_sha256: str) -> str:
    """A short name for (settings, training data): the same inputs always give the same id.

    Where the files lie and which device runs are left out: they do not change what is trained.
    """
    settings = dataclasses.asdict(spec)
    # Gradient checkpointing recomputes activations instead of keeping them: the same arithmetic.
    for local in ("train_path", "validation_path", "output_dir", "device", "gradient_checkpointing"):
        settings.pop(local)
    payload = json.dumps({"settings": settings, "train_sha256": train_sha256}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
