"""The code location's task: partitions, cadences and the task resource come from one place."""

import shutil
from pathlib import Path

import pytest

from distill_pipeline.core.task import BUILTIN_TASKS_DIR, TaskConfigError
from distill_pipeline.defs.core.partitions import train_sizes
from distill_pipeline.defs.core.resources import TaskResource, location_task


def test_size_partitions_are_the_location_tasks_training_sizes() -> None:
    assert train_sizes.get_partition_keys() == ["5pct", "10pct", "25pct", "50pct", "75pct", "100pct"]
    assert TaskResource().load() is location_task()


def test_a_task_resource_with_a_size_the_partitions_lack_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "other"
    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    text = (folder / "task.toml").read_text()
    (folder / "task.toml").write_text(text.replace('train_sizes = ["5%", "10%", "25%", "50%", "75%", "100%"]', 'train_sizes = ["33%"]'))
    with pytest.raises(TaskConfigError, match=r"\['33%'\].*DISTILL_TASK"):
        TaskResource(name=str(folder)).load()
    # A copy whose sizes are partitions of the location is served as it is.
    (folder / "task.toml").write_text(text.replace('train_sizes = ["5%", "10%", "25%", "50%", "75%", "100%"]', 'train_sizes = ["50%"]'))
    assert TaskResource(name=str(folder)).load().splits.train_sizes == ("50%",)
