"""Where students train: the Pipes client that launches the trainer, a local work folder, the GPUs.

Locally each ``lora_adapter`` step runs the standalone trainer as a subprocess through Dagster
Pipes, pinned to one GPU (or on CPU when the host has none). In production the same step is
placed on a GPU node: under ``dagster-k8s``'s ``k8s_job_executor`` (or ``K8sRunLauncher``) the
``dagster-k8s/config`` op tag below makes each training step its own pod requesting one NVIDIA
GPU; executors without Kubernetes ignore the tag, so it costs nothing here. ``dagster-k8s`` is
not a dependency of this project: the deployment that runs the executor installs it.
"""

import os
import tempfile
from pathlib import Path

import dagster as dg

from distill_pipeline.defs.students.launchers import training_pipes_client
from distill_pipeline.students.devices import visible_gpus

#: The concurrency pool of every training step; its limit is the number of GPUs (dagster.yaml).
GPU_POOL = "gpu"

class TrainerResource(dg.ConfigurableResource):
    """The local side of training: a work folder for run outputs, and the GPUs steps may take."""

    work_dir: str | None = None
    """Training runs write here before their adapter is published (``$DISTILL_WORK_DIR``, else a
    folder under the system temp dir). A retried step finds its run here and resumes from the last
    checkpoint, so on Kubernetes mount a volume for it."""

    gpu_devices: list[str] | None = None
    """GPU ids to use; None: ``$CUDA_VISIBLE_DEVICES``, else every GPU the NVIDIA driver lists."""

    gpu_wait_timeout_s: float = 3600.0
    """How long a step waits for a GPU to come free (the ``gpu`` pool normally makes this moot)."""

    def root(self) -> Path:
        chosen = self.work_dir or os.environ.get("DISTILL_WORK_DIR")
        return Path(chosen).expanduser() if chosen else Path(tempfile.gettempdir()) / "distill-train"

    def devices(self) -> list[str]:
        return visible_gpus(self.gpu_devices)


@dg.definitions
def resources() -> dg.Definitions:
    # DISTILL_DEPLOYMENT chooses where the trainer runs: a local subprocess, a GPU pod or an ECS
    # task (launchers.py); imported here because launchers.py reads this module's GPU placement.

    return dg.Definitions(resources={"trainer": TrainerResource(), "pipes_client": training_pipes_client()})
