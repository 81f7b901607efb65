"""Task files: the [student] table is the trainer's StudentSettings, key for key."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from distill_pipeline.core.task import BUILTIN_TASKS_DIR, TaskConfigError, load_task
from distill_pipeline.students.specs import build_train_spec
from distill_pipeline.trainer.spec import DEFAULT_PROMPT_TEMPLATE, StudentSettings


def task_with_student(folder: Path, **lines: str | None) -> Path:
    """The toxicity task with [student] lines set (key = TOML value), replaced or added; None drops one."""
    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    toml = folder / "task.toml"
    text = toml.read_text()
    start = text.index("[student]\n") + len("[student]\n")
    end = text.index("\n[", start)
    section = text[start:end]
    for key, value in lines.items():
        line = re.compile(rf"^{key} = .*\n", re.MULTILINE)
        new = "" if value is None else f"{key} = {value}\n"
        section = line.sub(new, section, count=1) if line.search(section) else new + section
    toml.write_text(text[:start] + section + text[end:])
    return folder


def test_the_toxicity_student_trains_as_it_always_has() -> None:
    # The values the task set, or the old pipeline defaults resolved to, before [student] became
    # StudentSettings: the demo trains the same student.
    student = load_task().student
    settings = dataclasses.asdict(student)
    expected = {
        "student_kind": "encoder",
        "base_model": None,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["query", "key", "value", "dense"],
        "max_length": None,
        "max_length_cap": 128,
        "prompt_template": DEFAULT_PROMPT_TEMPLATE,
        "packing": True,
        "epochs": 1,
        "min_train_steps": 60,
        "learning_rate": 2e-3,
        "lr_schedule": "linear",
        "warmup_ratio": 0.06,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "batch_size": 32,
        "grad_accum_steps": 1,
        "gradient_checkpointing": False,
        "seed": 0,
        "validation_fraction": 0.1,
        "calibrate_threshold": True,
        "eval_every_steps": 100,
        "early_stopping_patience": None,
        "checkpoint_every_steps": 100,
        "merged_export": False,
    }
    assert {name: settings[name] for name in expected} == expected
    # Settings the trainer gained since are at its defaults: the task does not set them.
    defaults = dataclasses.asdict(StudentSettings())
    assert {name: value for name, value in settings.items() if name not in expected} == {
        name: value for name, value in defaults.items() if name not in expected
    }


def test_a_task_file_sets_any_student_setting_and_it_reaches_the_train_spec(tmp_path: Path) -> None:
    folder = task_with_student(
        tmp_path / "task",
        grad_accum_steps="4",
        packing="false",
        lr_schedule='"cosine"',
        warmup_ratio="0",
        weight_decay="0.01",
        max_grad_norm="0.5",
        early_stopping_patience="3",
        gradient_checkpointing="true",
        max_length="64",
        merged_export="true",
        min_train_steps="200",
    )
    task = load_task(folder)
    expected = {
        "grad_accum_steps": 4,
        "packing": False,
        "lr_schedule": "cosine",
        "warmup_ratio": 0,
        "weight_decay": 0.01,
        "max_grad_norm": 0.5,
        "early_stopping_patience": 3,
        "gradient_checkpointing": True,
        "max_length": 64,
        "merged_export": True,
        "min_train_steps": 200,
    }
    spec = build_train_spec(task, tmp_path / "train.parquet", tmp_path / "out")
    for settings in (task.student, spec):
        assert {name: getattr(settings, name) for name in expected} == expected
    # Left out: the trainer's defaults.
    bare = load_task(task_with_student(tmp_path / "bare", lora_dropout=None, epochs=None)).student
    assert (bare.lora_dropout, bare.epochs) == (StudentSettings().lora_dropout, StudentSettings().epochs)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ({"learning_rte": "1e-3"}, "unknown key.*'learning_rte'"),
        # What only one run knows is the pipeline's to set.
        ({"train_path": '"x.parquet"'}, "unknown key.*'train_path'"),
        ({"epochs": '"3"'}, "epochs must be int"),
        ({"packing": '"yes"'}, "packing must be bool"),
        ({"lr_schedule": '"step"'}, "lr_schedule must be 'linear' or 'cosine' or 'constant'"),
        ({"grad_accum_steps": "0"}, "grad_accum_steps must be at least 1"),
        ({"target_modules": '["query", 3]'}, "target_modules must be a list of str"),
        ({"student_kind": '"rnn"'}, "student_kind must be 'encoder' or 'decoder'"),
        ({"student_kind": '"decoder"'}, "decoder student needs base_model"),
    ],
)
def test_a_bad_student_section_is_refused_naming_the_key(tmp_path: Path, lines: dict[str, str], message: str) -> None:
    with pytest.raises(TaskConfigError, match=rf"\[student\].*{message}"):
        load_task(task_with_student(tmp_path / "task", **lines))


def test_the_old_kind_key_still_sets_student_kind(tmp_path: Path) -> None:
    folder = task_with_student(tmp_path / "task", student_kind=None, kind='"decoder"', base_model='"some/llm"')
    student = load_task(folder).student
    assert (student.student_kind, student.base_model) == ("decoder", "some/llm")
    both = task_with_student(tmp_path / "both", kind='"decoder"', base_model='"some/llm"')
    with pytest.raises(TaskConfigError, match="both 'student_kind' and its old name 'kind'"):
        load_task(both)
