"""What a training run depends on, as JSON-serialisable dataclasses.

``StudentSettings`` is every option a task may set for its student (the task file's ``[student]``
table takes exactly these field names); ``TrainSpec`` adds what only one run knows: its data files,
label set, output folder and device. The spec is the trainer's only input. It is written verbatim
(one flat JSON object) to ``<output_dir>/spec.json``, and a run only resumes from checkpoints made
under the same spec.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

StudentKind = Literal["encoder", "decoder"]
LrSchedule = Literal["linear", "cosine", "constant"]
# How several processes (torchrun) share the work: "ddp" keeps a whole model on every GPU and
# averages gradients; "fsdp" shards the weights, gradients and optimiser state over the GPUs.
Distributed = Literal["ddp", "fsdp"]

INPUT_PLACEHOLDER = "{input}"
DEFAULT_PROMPT_TEMPLATE = "Classify the text.\nText: {input}\nAnswer:"


@dataclass(kw_only=True)
class StudentSettings:
    """How a LoRA student is built and trained, whatever data it is trained on."""

    # Model: a Hugging Face id or a local folder. None means the packaged all-MiniLM-L6-v2
    # (encoder only; its weights' SHA-256 is checked on load).
    student_kind: StudentKind = "encoder"
    base_model: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # None: for a decoder every linear layer but the output head (PEFT's "all-linear"), which is
    # what closes most of the gap to a full fine-tune; for an encoder PEFT's default (BERT:
    # query, value).
    target_modules: list[str] | None = None
    # Train every weight of the base instead of LoRA weights (the LoRA fields are then unused);
    # adapter/ then holds the whole model as safetensors, for comparison with the LoRA student.
    full_finetune: bool = False
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
    # None: no minimum. Else a training set too small for this many optimiser steps in `epochs`
    # gets the fewest more epochs that reach it: a few dozen steps are too few for a classifier
    # to leave the majority label.
    min_train_steps: int | None = None
    learning_rate: float = 2e-4
    lr_schedule: LrSchedule = "linear"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    # Cross-entropy against (1 - e) * target + e / labels, over the label set (a decoder: over its
    # labels' whole answers), so the student is not pushed to certainty on noisy teacher labels.
    label_smoothing: float = 0.0
    # With a soft_label_column: the target is this weight on the soft distribution (1 - p, p) and
    # the rest on the hard label. Rows without a soft value use the hard label. 0: hard labels
    # only; the pipeline hands the trainer its soft labels only when this is above 0.
    soft_label_weight: float = 0.0
    # Per process: under torchrun each of N processes takes batch_size examples of every global
    # micro-batch, so an optimiser step sees batch_size * grad_accum_steps * N examples.
    batch_size: int = 16
    grad_accum_steps: int = 1
    distributed: Distributed = "ddp"
    # Recompute each layer's activations in the backward pass instead of keeping them: less
    # memory for longer sequences or larger batches, about a third more compute per step.
    gradient_checkpointing: bool = False
    seed: int = 0

    # Without a validation file, this fraction of the training rows (a seeded draw) validates.
    validation_fraction: float = 0.1
    # Two labels with a positive_label: the cut-off on P(positive) that maximises validation
    # accuracy is recorded beside the adapter and used by every prediction; otherwise argmax.
    calibrate_threshold: bool = True
    # Validation (loss and accuracy) every N optimiser steps and always at the end; None: at the
    # end only. With early stopping, training stops after this many validations without a better
    # loss. The exported adapter is the one with the best validation loss.
    eval_every_steps: int | None = 50
    early_stopping_patience: int | None = None

    # None: no checkpoints (a killed run then starts over).
    checkpoint_every_steps: int | None = 100
    # Also export the base with the adapter merged into it (merged/).
    merged_export: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the settings, each naming its field; empty when they are valid."""
        problems = type_problems(self, [f.name for f in fields(StudentSettings)])
        if problems:
            # The checks below compare values, which a value of the wrong type would break.
            return problems
        if self.student_kind == "decoder" and self.base_model is None:
            problems.append("a decoder student needs base_model (a Hugging Face id or local path)")
        if self.target_modules is not None and not self.target_modules:
            problems.append("target_modules must name at least one module, or be null for PEFT's default")
        if self.prompt_template.count(INPUT_PLACEHOLDER) != 1:
            problems.append(f"prompt_template must contain {INPUT_PLACEHOLDER} exactly once")
        if not 0.0 < self.validation_fraction < 1.0:
            problems.append("validation_fraction must be between 0 and 1")
        for name in ("lora_r", "epochs", "batch_size", "grad_accum_steps", "max_length_cap"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in (
            "max_length",
            "min_train_steps",
            "eval_every_steps",
            "early_stopping_patience",
            "checkpoint_every_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1 or null")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append("lora_dropout must be in [0, 1)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append("warmup_ratio must be in [0, 1)")
        if self.learning_rate <= 0.0:
            problems.append("learning_rate must be positive")
        if self.weight_decay < 0.0:
            problems.append("weight_decay must not be negative")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0.0:
            problems.append("max_grad_norm must be positive or null")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append("label_smoothing must be in [0, 1)")
        if not 0.0 <= self.soft_label_weight <= 1.0:
            problems.append("soft_label_weight must be in [0, 1]")
        if self.full_finetune and self.merged_export:
            problems.append("merged_export merges LoRA weights; a full_finetune's adapter/ already is the whole model")
        return problems


@dataclass(kw_only=True)
class TrainSpec(StudentSettings):
    """One training run of a LoRA student. Paths are local files or folders."""

    # Data: Parquet or JSON Lines files with a text column and an integer label column.
    train_path: str
    # None: validation_fraction of the training rows validates.
    validation_path: str | None = None
    text_column: str = "input"
    label_column: str = "label"
    # Two labels only: a column of P(positive) in [0, 1] (e.g. the teacher's own probability),
    # trained against as soft targets (soft_label_weight); null cells use the hard label.
    # Validation always scores the hard labels.
    soft_label_column: str | None = None
    # None: the sorted distinct labels of the training data.
    label_values: list[int] | None = None
    # None: the values as text. A decoder student is trained to answer with these names.
    label_names: list[str] | None = None
    # Two labels only: the label whose probability calibrate_threshold's cut-off applies to
    # (without it, predictions are argmax).
    positive_label: int | None = None

    # Outputs and runtime.
    output_dir: str = "student"
    device: str = "auto"

    def problems(self) -> list[str]:
        settings = {f.name for f in fields(StudentSettings)}
        problems = super().problems() + type_problems(self, [f.name for f in fields(self) if f.name not in settings])
        if problems:
            return problems
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
        if self.soft_label_column is not None and self.positive_label is None:
            problems.append("soft_label_column needs positive_label (soft targets are P(positive) of two labels)")
        if self.soft_label_column is not None and self.soft_label_column in (self.text_column, self.label_column):
            problems.append("soft_label_column must be a column of its own, not the text or label column")
        return problems

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


def type_problems(spec: StudentSettings, names: list[str]) -> list[str]:
    """The named fields whose values do not have their annotated type, one message each.

    Specs come from JSON and TOML files, where ``epochs = "3"`` or ``packing = "yes"`` parse fine;
    checked here, the mistake is named by its field rather than surfacing as a TypeError mid-run.
    """
    hints = typing.get_type_hints(type(spec))
    return [
        f"{name} must be {_type_name(hints[name])}, not {getattr(spec, name)!r}"
        for name in names
        if not _has_type(getattr(spec, name), hints[name])
    ]


def _has_type(value: object, annotation: object) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(item, args[0]) for item in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        # An int is a float here (TOML and JSON may write 0 for 0.0); a bool is neither.
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)  # type: ignore[arg-type]


def _type_name(annotation: object) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " or ".join(repr(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))
