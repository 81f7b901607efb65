"""Student variants in the task file: parsing, validation, the specs they give, and the partitions they make."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from distill_pipeline.core.task import BASE_VARIANT, BUILTIN_TASKS_DIR, TaskConfigError, load_task
from distill_pipeline.students.specs import build_train_spec, train_id


def _task_with(tmp_path: Path, variants: str, promotion: str = "") -> Path:
    """The toxicity task with its [variants] and [promotion] sections replaced."""
    folder = tmp_path / "task"
    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    text = (folder / "task.toml").read_text()
    assert "\n[variants]\n" in text
    (folder / "task.toml").write_text(text.split("\n[variants]\n")[0] + "\n" + variants + "\n" + promotion)
    return folder


def test_the_builtin_task_declares_one_lever_variants_and_trains_base_in_the_demo() -> None:
    task = load_task()
    assert list(task.variants) == [BASE_VARIANT, "long_context", "rank16", "label_smoothing", "soft_labels"]
    assert task.demo_variants == (BASE_VARIANT,)
    base = task.variant(BASE_VARIANT)
    assert base.settings == task.student and base.overrides == {}
    long_context = task.variant("long_context")
    assert long_context.overrides == {"max_length_cap": 256} and long_context.change() == "max_length_cap=256"
    # Everything else is the base student's.
    assert dataclasses.replace(long_context.settings, max_length_cap=task.student.max_length_cap) == task.student
    assert task.variant("rank16").settings.lora_r == 16 and task.variant("rank16").settings.lora_alpha == 32
    assert task.promotion.alpha == 0.05 and task.promotion.decisive == ("in_distribution",)
    with pytest.raises(KeyError, match="no student variant 'nope'"):
        task.variant("nope")


def test_a_variant_trains_its_own_settings_under_its_own_train_id(tmp_path: Path) -> None:
    task = load_task()
    base = build_train_spec(task, tmp_path / "train.parquet", tmp_path / "out")
    rank16 = build_train_spec(task, tmp_path / "train.parquet", tmp_path / "out", "rank16")
    assert (base.lora_r, rank16.lora_r, rank16.max_length_cap) == (8, 16, task.student.max_length_cap)
    assert train_id(base, "abc") != train_id(rank16, "abc")
    assert train_id(build_train_spec(task, "x", "y", BASE_VARIANT), "abc") == train_id(base, "abc")


def test_a_task_without_variants_has_base_alone(tmp_path: Path) -> None:
    task = load_task(_task_with(tmp_path, ""))
    assert list(task.variants) == [BASE_VARIANT] and task.demo_variants == (BASE_VARIANT,)


def test_variants_and_the_demo_list_come_from_the_task_file(tmp_path: Path) -> None:
    text = """[variants]
demo = ["base", "smooth"]
[variants.smooth]
description = "softer targets"
label_smoothing = 0.2
epochs = 2
[variants.old_name]
kind = "encoder"
lora_r = 4
"""
    task = load_task(
        _task_with(tmp_path, text, '[promotion]\nalpha = 0.01\ndecisive = ["in_distribution", "balanced"]\n')
    )
    smooth = task.variant("smooth")
    assert smooth.description == "softer targets"
    assert (smooth.settings.label_smoothing, smooth.settings.epochs) == (0.2, 2)
    assert smooth.change() == "label_smoothing=0.2, epochs=2"
    # The old key is read as its new name; a value equal to base's is no change.
    assert task.variant("old_name").overrides == {"lora_r": 4}
    assert task.demo_variants == ("base", "smooth")
    assert (task.promotion.alpha, task.promotion.decisive) == (0.01, ("in_distribution", "balanced"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[variants.wide]\nlora_rank = 16", r"\[variants.wide\] has unknown key\(s\) 'lora_rank'"),
        ('[variants.wide]\nlora_r = "16"', r"\[variants.wide\]: .*lora_r must be int, not '16'"),
        ("[variants.wide]\nlora_r = true", r"\[variants.wide\]: .*lora_r must be int"),
        ("[variants.wide]\nlora_r = 0", r"\[variants.wide\]: .*lora_r must be at least 1"),
        ("[variants.wide]\nlabel_smoothing = 1.5", r"\[variants.wide\]: .*label_smoothing must be in \[0, 1\)"),
        ("[variants.wide]\ndescription = 3\nlora_r = 16", "description must be a string"),
        ('[variants.wide]\ndescription = "nothing"', "changes nothing"),
        ("[variants.wide]\nlora_r = 8", "changes nothing"),
        ("[variants.base]\nlora_r = 16", "the base variant is the \\[student\\] table"),
        ('[variants."Wide|x"]\nlora_r = 16', "a variant name is"),
        ('[variants."../escape"]\nlora_r = 16', "a variant name is"),
        ("[variants]\nwide = 16", r"\[variants.wide\] must be a table"),
        (
            "[variants.a]\nlora_r = 16\n[variants.b]\nlora_r = 16",
            r"\[variants.b\] trains the same student as \[variants.a\]",
        ),
        ('[variants]\ndemo = ["base", "ghost"]', "demo names unknown variant"),
        ("[variants]\ndemo = []", "demo must be a non-empty list"),
        ('[variants]\ndemo = "base"', "demo must be a non-empty list"),
        ('[variants.dec]\nstudent_kind = "decoder"', "a decoder student needs base_model"),
        ('[variants.k]\nkind = "decoder"\nstudent_kind = "encoder"', "sets both 'student_kind' and its old name"),
    ],
)
def test_hostile_variants_fail_naming_the_variant_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TaskConfigError, match=message):
        load_task(_task_with(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[promotion]\nalpha = 0.7", "promotion.alpha must be between 0 and 0.5"),
        ('[promotion]\nalpha = "0.05"', "promotion.alpha must be a number"),
        ("[promotion]\nresamples = 10", "promotion.resamples must be between"),
        ("[promotion]\ndecisive = []", "promotion.decisive must name at least one"),
        ('[promotion]\ndecisive = "balanced"', "promotion.decisive must be a list"),
        ("[promotion]\nbeta = 1", "beta"),
    ],
)
def test_a_bad_promotion_section_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TaskConfigError, match=message):
        load_task(_task_with(tmp_path, "", text))


def test_the_student_partitions_are_every_size_with_every_variant() -> None:
    from distill_pipeline.defs.core.partitions import size_and_variant, sizes_and_variants, student_partition

    keys = sizes_and_variants.get_partition_keys()
    task = load_task()
    assert len(keys) == len(task.splits.train_sizes) * len(task.variants)
    assert student_partition("100pct") == "100pct|base" and "100pct|rank16" in keys
    assert size_and_variant("25pct|long_context") == ("25pct", "long_context")


def test_a_variant_weighing_soft_targets_trains_on_the_soft_label_column() -> None:
    from distill_pipeline.students.specs import SOFT_LABEL_COLUMN, build_train_spec, train_id

    task = load_task("toxicity")
    hard = build_train_spec(task, "train.parquet", "out")
    soft = build_train_spec(task, "train.parquet", "out", "soft_labels")
    assert (hard.soft_label_column, hard.soft_label_weight) == (None, 0.0)
    assert (soft.soft_label_column, soft.soft_label_weight) == (SOFT_LABEL_COLUMN, 1.0)
    assert train_id(hard, "x") != train_id(soft, "x")
