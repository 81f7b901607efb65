"""Where student steps run: the Pipes client that launches the trainer, a local work folder, the GPUs.

Locally each ``lora_adapter`` step runs the standalone trainer as a subprocess through Dagster
Pipes (under ``torchrun`` when it uses several GPUs), pinned to the GPUs it holds (or on CPU when
the host has none); each step that predicts with a student holds one GPU the same way. Every such
step is in the ``gpu`` pool. Dagster's pools count one slot per step whatever the step asks for,
so the pool bounds the GPU *steps* at once, and the device locks count the GPUs: a two-GPU step
takes two devices together, or waits (holding its slot, no device) until two are free. In
production the op tags of ``launchers.py`` place each step on GPU nodes under a step-level
executor, and the Pipes pod or task clients give the trainer GPUs of its own.
"""

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import dagster as dg

from distill_pipeline.defs.students.launchers import gpus_per_step, training_pipes_client
from distill_pipeline.students.devices import (
    claim_gpus,
    host_lock_dir,
    torch_device,
    training_run_lock,
    visible_gpus,
)

#: The concurrency pool of every step that trains or predicts with a student (dagster.yaml).
GPU_POOL = "gpu"

Log = Callable[[str], None]


class TrainerResource(dg.ConfigurableResource):
    """The local side of student steps: a work folder for training runs, and the GPUs steps take."""

    work_dir: str | None = None
    """Training runs write here before their adapter is published (``$DISTILL_WORK_DIR``, else a
    folder under the system temp dir). A retried step finds its run here and resumes from the last
    checkpoint, so on Kubernetes mount a volume for it. The GPU and run locks live here too."""

    gpu_devices: list[str] | None = None
    """GPU ids to use; None: ``$CUDA_VISIBLE_DEVICES``, else every GPU the NVIDIA driver lists."""

    gpus_per_step: int = gpus_per_step()
    """GPUs one training step uses (``$DISTILL_GPUS_PER_STEP``, default 1): one trainer process per
    GPU under ``torchrun``. Change it through the variable: the op tags that request a step's GPUs
    of Kubernetes or ECS are fixed when the code location loads."""

    gpu_wait_timeout_s: float = 3600.0
    """How long a step waits for its GPUs to come free (the ``gpu`` pool normally makes this moot)."""

    same_run_wait_timeout_s: float = 48 * 3600.0
    """How long a training step waits for another run training the same spec on the same data."""

    def root(self) -> Path:
        chosen = self.work_dir or os.environ.get("DISTILL_WORK_DIR")
        return Path(chosen).expanduser() if chosen else Path(tempfile.gettempdir()) / "distill-train"

    def devices(self) -> list[str]:
        return visible_gpus(self.gpu_devices)

    @contextmanager
    def gpus(self, count: int, log: Log) -> Iterator[list[str]]:
        """Hold ``count`` GPUs of this host together for the block ([] without a GPU)."""
        if count < 1:
            raise dg.Failure(f"gpus_per_step is {count}: a step needs at least one GPU")
        devices = self.devices()
        with claim_gpus(
            devices,
            count,
            host_lock_dir(self.root()),
            timeout_s=self.gpu_wait_timeout_s,
            on_wait=lambda: log(f"waiting for {count} of the GPUs {', '.join(devices)} to come free"),
        ) as held:
            yield held

    @contextmanager
    def inference_device(self, log: Log) -> Iterator[str]:
        """One GPU held for the block, as the torch device to load a student on ("cpu" without one).

        On a GPU the trainer's loader reads the student in half precision (bf16 where native).
        """
        with self.gpus(1, log) as held:
            if held:
                log(f"predicting on GPU {held[0]}, held for this step")
            else:
                log("no GPU on this host (or none configured): predicting on CPU")
            yield torch_device(held[0] if held else None)

    def training_run(self, run_name: str, log: Log) -> AbstractContextManager[None]:
        """The lock of the run folder ``run_name``: one training run per train id at a time."""
        return training_run_lock(
            self.root(),
            run_name,
            timeout_s=self.same_run_wait_timeout_s,
            on_wait=lambda: log(f"another run is training {run_name} (same settings, same data): waiting for it"),
        )


@dg.definitions
def resources() -> dg.Definitions:
    # DISTILL_DEPLOYMENT chooses where the trainer runs: a local subprocess, a GPU pod or an ECS
    # task (launchers.py).
    return dg.Definitions(resources={"trainer": TrainerResource(), "pipes_client": training_pipes_client()})
