"""The trainer's spec for a training set of the task, and the id a (spec, data) pair is known by."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from distill_pipeline.core.task import Task
from distill_pipeline.trainer.spec import TrainSpec

#: The trainer's command-line entry point, run as ``python -m TRAINER_MODULE --spec FILE``.
TRAINER_MODULE = "distill_pipeline.trainer.train"
TEXT_COLUMN = "input"
LABEL_COLUMN = "label"


def build_train_spec(task: Task, train_path: str | Path, output_dir: str | Path, train_rows: int) -> TrainSpec:
    """The TrainSpec for the task's student on one training-set file of ``train_rows`` rows."""
    student = task.student
    fitted_rows = max(1, round(train_rows * (1 - student.validation_fraction)))
    steps_per_epoch = math.ceil(fitted_rows / student.batch_size)
    epochs = max(student.epochs, math.ceil(student.min_train_steps / steps_per_epoch))
    optional = {"prompt_template": student.prompt_template} if student.prompt_template else {}
    return TrainSpec(
        train_path=str(train_path),
        validation_fraction=student.validation_fraction,
        text_column=TEXT_COLUMN,
        label_column=LABEL_COLUMN,
        label_values=list(task.label.values),
        label_names=list(task.label.names),
        positive_label=task.label.positive if len(task.label.values) == 2 else None,
        calibrate_threshold=student.calibrate_threshold,
        student_kind=student.kind,  # type: ignore[arg-type]
        base_model=student.base_model,
        lora_r=student.lora_r,
        lora_alpha=student.lora_alpha,
        lora_dropout=student.lora_dropout,
        target_modules=list(student.target_modules) if student.target_modules is not None else None,
        max_length_cap=student.max_length_cap,
        epochs=epochs,
        learning_rate=student.learning_rate,
        batch_size=student.batch_size,
        seed=student.seed,
        eval_every_steps=student.eval_every_steps,
        checkpoint_every_steps=student.checkpoint_every_steps,
        output_dir=str(output_dir),
        **optional,
    )


def train_id(spec: TrainSpec, train_sha256: str) -> str:
    """A short name for (settings, training data): the same inputs always give the same id.

    Where the files lie and which device runs are left out: they do not change what is trained.
    """
    settings = dataclasses.asdict(spec)
    for local in ("train_path", "validation_path", "output_dir", "device"):
        settings.pop(local)
    payload = json.dumps({"settings": settings, "train_sha256": train_sha256}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


