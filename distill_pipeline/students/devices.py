"""Which GPU a training step runs on: one step per device, pinned through ``CUDA_VISIBLE_DEVICES``.

The ``gpu`` concurrency pool bounds how many training steps run at once (its limit is the number
of GPUs); this module decides *which* device a step takes. A step holds an exclusive ``flock`` on
one lock file per device for as long as it trains, so two steps on a host never share a GPU, and
the kernel releases the lock of a step that dies. Devices are found without importing torch.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

NVIDIA_PROC_DIR = Path("/proc/driver/nvidia/gpus")
POLL_SECONDS = 2.0


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


def device_env(device: str | None) -> dict[str, str]:
    """Environment that pins a subprocess to ``device``, or hides every GPU when it is None."""
    # PCI bus order makes index N the same GPU for CUDA as for nvidia-smi and the driver's listing.
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": device if device is not None else ""}


@contextmanager
def claim_gpu(devices: Sequence[str], lock_dir: Path, *, timeout_s: float = 3600.0) -> Iterator[str | None]:
    """Hold one free device of ``devices`` for the block (None when there are none), waiting up
    to ``timeout_s`` for a device to come free."""
    if not devices:
        yield None
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for device in devices:
            handle = open(lock_dir / f"gpu-{device}.lock", "w")  # noqa: SIM115 - held across the yield
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield device
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no GPU of {list(devices)} came free within {timeout_s:.0f}s")
        time.sleep(POLL_SECONDS)
