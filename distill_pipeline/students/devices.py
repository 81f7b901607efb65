"""Where student work runs on a host: the GPUs a step holds, and one training run per train id.

The ``gpu`` concurrency pool bounds how many GPU steps run at once; this module decides *which*
devices a step takes. A step holds an exclusive ``flock`` on one lock file per device for as long
as it trains or predicts, so two steps on a host never share a GPU, and the kernel releases the
locks of a step that dies. A step needing several GPUs takes them all or none: claimants queue on
one host-wide lock, and only the head of the queue collects devices as they come free, so two
steps can never each hold half of what they need. Devices are found without importing torch.

Training runs of one train id (the same settings on the same data) share a run folder, so they
are serialised by a lock per train id: the second waits, then finds the first's published result
or resumes from its checkpoints. The locks live beside the run folders, on the volume every run
container (or node) of a deployment mounts, under the id of the host's running kernel, so steps on
different machines sharing that volume never wait for each other's devices.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

from distill_pipeline.students.specs import TRAINER_MODULE

NVIDIA_PROC_DIR = Path("/proc/driver/nvidia/gpus")
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
POLL_SECONDS = 2.0
#: The launcher of one trainer process per GPU (the module behind the ``torchrun`` command, run with
#: the step's own interpreter so that it needs nothing on PATH).
TORCHRUN_MODULE = "torch.distributed.run"


class PlacementError(RuntimeError):
    """A step asks for more GPUs than its host has; waiting would never help."""


def visible_gpus(configured: Sequence[str] | None = None) -> list[str]:
    """The GPU ids a step may use: ``configured``, else ``$CUDA_VISIBLE_DEVICES``, else every
    NVIDIA GPU the driver lists (indices in PCI bus order); empty on a machine without one."""
    if configured is not None:
        return [str(device) for device in configured]
    from_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if from_env is not None:
        return [device.strip() for device in from_env.split(",") if device.strip() and device.strip() != "-1"]
    if NVIDIA_PROC_DIR.is_dir():
        return [str(index) for index in range(len(list(NVIDIA_PROC_DIR.iterdir())))]
    return []


def device_env(devices: str | Sequence[str] | None) -> dict[str, str]:
    """Environment that pins a subprocess to ``devices``, or hides every GPU when there are none."""
    chosen = [devices] if isinstance(devices, str) else list(devices or [])
    # PCI bus order makes index N the same GPU for CUDA as for nvidia-smi and the driver's listing.
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(chosen)}


def torch_device(device: str | None) -> str:
    """The torch device of a claimed GPU id in *this* process ("cpu" for None).

    A step that predicts in its own process cannot narrow its ``CUDA_VISIBLE_DEVICES`` once CUDA
    may be initialised (an in-process executor runs many steps in one process), so it addresses
    the claimed device by its index among the devices the process sees.
    """
    if device is None:
        return "cpu"
    from_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if from_env is not None:
        visible = [d.strip() for d in from_env.split(",") if d.strip()]
        if device not in visible:
            raise PlacementError(f"GPU {device} is not among this process's CUDA_VISIBLE_DEVICES={from_env!r}")
        return f"cuda:{visible.index(device)}"
    # Without a narrowed list the ids are the driver's, in PCI bus order; CUDA numbers devices that
    # way only when told to before it initialises, which nothing in a step has done by now.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return f"cuda:{int(device)}"


def host_lock_dir(root: Path) -> Path:
    """The lock folder of this machine under ``root``: shared by every container of the host
    (they share its kernel, hence its boot id), apart from other machines mounting the same volume."""
    try:
        host = BOOT_ID_FILE.read_text().strip() or "host"
    except OSError:
        host = "host"
    return root / "gpu-locks" / host


def _lock_name(device: str) -> str:
    """A device's lock file: named by its PCI address where the driver lists it, so that two
    containers numbering the host's GPUs differently still lock the same file for the same GPU."""
    if device.isdigit() and NVIDIA_PROC_DIR.is_dir():
        addresses = sorted(p.name for p in NVIDIA_PROC_DIR.iterdir())
        if int(device) < len(addresses):
            return f"gpu-{addresses[int(device)].replace(':', '_')}.lock"
    return f"gpu-{device.replace('/', '_')}.lock"


def _try_lock(path: Path) -> IO[str] | None:
    handle = open(path, "a")  # noqa: SIM115 - held until released by the caller
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _release(handle: IO[str]) -> None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


@contextmanager
def exclusive(
    path: Path,
    *,
    timeout_s: float,
    poll_s: float = POLL_SECONDS,
    what: str = "the lock",
    on_wait: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Hold the ``flock`` of ``path`` for the block, waiting up to ``timeout_s``; ``on_wait`` is
    called once if it has to wait. The file is left in place: unlinking a lock file races with a
    process about to lock it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    waited = False
    while (handle := _try_lock(path)) is None:
        if not waited and on_wait is not None:
            on_wait()
        waited = True
        left = deadline - time.monotonic()
        if left < 0:
            raise TimeoutError(f"{what} ({path}) was not released within {timeout_s:.0f}s")
        time.sleep(min(poll_s, left + 0.001))
    try:
        yield
    finally:
        _release(handle)


@contextmanager
def claim_gpus(
    devices: Sequence[str],
    count: int,
    lock_dir: Path,
    *,
    timeout_s: float = 3600.0,
    poll_s: float = POLL_SECONDS,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[list[str]]:
    """Hold ``count`` devices of ``devices`` together for the block, in the order listed (an
    empty list when there are no devices: the step runs on CPU), waiting up to ``timeout_s``.

    All or nothing: only the claimant holding the queue lock collects devices, so no step ever
    holds some of its devices while another holds the rest. A step claims once (it never asks for
    more while holding some), which is what keeps the queue free of cycles.
    """
    if count < 1:
        raise PlacementError(f"a step needs at least one GPU, not {count}")
    if not devices:
        yield []
        return
    if count > len(devices):
        raise PlacementError(
            f"a step needs {count} GPUs; this host has {len(devices)} ({', '.join(devices)}): "
            "lower the GPUs per step or run it on a larger machine"
        )
    deadline = time.monotonic() + timeout_s
    waited = False

    def waiting() -> None:
        nonlocal waited
        if not waited and on_wait is not None:
            on_wait()
        waited = True

    with ExitStack() as held:
        with exclusive(
            lock_dir / "queue.lock",
            timeout_s=timeout_s,
            poll_s=poll_s,
            what=f"the GPU queue of {list(devices)}",
            on_wait=waiting,
        ):
            chosen: dict[str, IO[str]] = {}
            while True:
                for device in devices:
                    if device not in chosen and len(chosen) < count:
                        handle = _try_lock(lock_dir / _lock_name(device))
                        if handle is not None:
                            chosen[device] = handle
                            held.callback(_release, handle)
                if len(chosen) == count:
                    break
                waiting()
                left = deadline - time.monotonic()
                if left < 0:
                    raise TimeoutError(f"{count} GPU(s) of {list(devices)} did not come free within {timeout_s:.0f}s")
                time.sleep(min(poll_s, left + 0.001))
        yield [device for device in devices if device in chosen]


@contextmanager
def claim_gpu(devices: Sequence[str], lock_dir: Path, *, timeout_s: float = 3600.0) -> Iterator[str | None]:
    """Hold one free device of ``devices`` for the block (None when there are none)."""
    with claim_gpus(devices, 1, lock_dir, timeout_s=timeout_s) as chosen:
        yield chosen[0] if chosen else None


def training_command(spec_file: Path | str, processes: int, python: str = sys.executable) -> list[str]:
    """The trainer's command line: one process, or ``torchrun --standalone --nproc-per-node N``
    (one process per GPU of the step, rendezvous on the host itself) when ``processes`` > 1."""
    if processes > 1:
        launcher = ["-m", TORCHRUN_MODULE, "--standalone", "--nproc-per-node", str(processes)]
        return [python, *launcher, "-m", TRAINER_MODULE, "--spec", str(spec_file)]
    return [python, "-m", TRAINER_MODULE, "--spec", str(spec_file)]


def command_processes(command: Sequence[str]) -> int:
    """How many trainer processes (one per GPU) a :func:`training_command` starts."""
    args = list(command)
    if TORCHRUN_MODULE in args and "--nproc-per-node" in args:
        return int(args[args.index("--nproc-per-node") + 1])
    return 1


def training_run_lock(
    root: Path,
    run_name: str,
    *,
    timeout_s: float,
    poll_s: float = POLL_SECONDS,
    on_wait: Callable[[], None] | None = None,
) -> contextlib.AbstractContextManager[None]:
    """The lock of the run folder ``root/run_name``: whoever holds it alone writes, resumes,
    publishes or deletes that folder; another run of the same train id waits for it."""
    return exclusive(
        root / "run-locks" / f"{run_name}.lock",
        timeout_s=timeout_s,
        poll_s=poll_s,
        what=f"the training run {run_name}",
        on_wait=on_wait,
    )
