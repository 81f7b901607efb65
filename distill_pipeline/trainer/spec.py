"""TrainSpec: everything a training run depends on, as one JSON-serialisable dataclass.

The spec is the trainer's only input. It is written verbatim to ``<output_dir>/spec.json``, and a
run only resumes from checkpoints made under the same spec.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

StudentKind = Literal["encoder", "decoder"]
LrSchedule = Literal["linear", "cosine", "constant"]

INPUT_PLACEHOLDER = "{input}"
DEFAULT_PROMPT_TEMPLATE = "Classify the text.\nText: {input}\nAnswer:"


@dataclass
class TrainSpec:
    """One training run of a LoRA student. Paths are local files or folders."""

    # Data: Parquet or JSON Lines files with a text column and an integer label column.
    train_path: str
    validation_path: str | None = None
    # Without a validation file, this fraction of the training rows (a seeded draw) validates.
    validation_fraction: float = 0.1
    text_column: str = "input"
    label_column: str = "label"
    # None: the sorted distinct labels of the training data.
    label_values: list[int] | None = None
    # None: the values as text. A decoder student is trained to answer with these names.
    label_names: list[str] | None = None
    # Two labels only: the label whose probability the decision threshold cuts. With
    # calibrate_threshold, the cut-off that maximises validation accuracy is recorded beside the
    # adapter and used by every prediction; otherwise (or without positive_label) it is argmax.
    positive_label: int | None = None
    calibrate_threshold: bool = True

    # Model: a Hugging Face id or a local folder. None means the packaged all-MiniLM-L6-v2
    # (encoder only; its weights' SHA-256 is checked on load).
    student_kind: StudentKind = "encoder"
    base_model: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # None: PEFT's per-architecture default (BERT: query, value; Llama/Qwen/Mistral: q_proj, v_proj).
    target_modules: list[str] | None = None
    # None: the 95th percentile of the training set's tokenised lengths, rounded up to a
    # multiple of 8 and capped by max_length_cap and the model's position limit.
    max_length: int | None = None
    max_length_cap: int = 512
    # Decoder only: how an input is rendered; the answer is " <label name>" plus EOS.
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    # Decoder only: pack the examples of a micro-batch into rows of up to max_length tokens.
    packing: bool = True

    # Optimisation. batch_size counts examples per micro-batch.
    epochs: int = 3
    learning_rate: float = 2e-4
    lr_schedule: LrSchedule = "linear"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 16
    grad_accum_steps: int = 1
    seed: int = 0

    # Validation (loss and accuracy) every N optimiser steps and always at the end; None: at the
    # end only. With early stopping, training stops after this many validations without a better
    # loss. The exported adapter is the one with the best validation loss.
    eval_every_steps: int | None = 50
    early_stopping_patience: int | None = None

    # Outputs and runtime.
    output_dir: str = "student"
    # None: no checkpoints (a killed run then starts over).
    checkpoint_every_steps: int | None = 100
    device: str = "auto"
    merged_export: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.student_kind not in ("encoder", "decoder"):
            problems.append(f"student_kind must be 'encoder' or 'decoder', not {self.student_kind!r}")
        if self.student_kind == "decoder" and self.base_model is None:
            problems.append("a decoder student needs base_model (a Hugging Face id or local path)")
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            problems.append(f"lr_schedule must be linear, cosine or constant, not {self.lr_schedule!r}")
        if self.prompt_template.count(INPUT_PLACEHOLDER) != 1:
            problems.append(f"prompt_template must contain {INPUT_PLACEHOLDER} exactly once")
        if self.label_names is not None and (
            self.label_values is None or len(self.label_names) != len(self.label_values)
        ):
            problems.append("label_names needs label_values of the same length")
        if self.label_values is not None and len(set(self.label_values)) != len(self.label_values):
            problems.append("label_values must be distinct")
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            problems.append("label_names must be distinct")
        if self.positive_label is not None and (
            self.label_values is None or self.positive_label not in self.label_values or len(self.label_values) != 2
        ):
            problems.append("positive_label needs exactly two label_values, one of them the positive_label")
        if not 0.0 < self.validation_fraction < 1.0:
            problems.append("validation_fraction must be between 0 and 1")
        for name in ("lora_r", "epochs", "batch_size", "grad_accum_steps", "max_length_cap"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("max_length", "eval_every_steps", "early_stopping_patience", "checkpoint_every_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1 or null")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append("warmup_ratio must be in [0, 1)")
        if problems:
            raise ValueError("invalid TrainSpec: " + "; ".join(problems))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a TrainSpec is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown TrainSpec fields: {', '.join(unknown)}")
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainSpec:
        return cls.from_json(Path(path).read_text())
