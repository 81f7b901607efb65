"""Several processes, one run: what torchrun's environment says, and the few collectives the trainer uses.

``torchrun --nproc-per-node N -m distill_pipeline.trainer.train --spec FILE`` starts N copies of
the trainer with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set; without them (``python -m ...``)
the run is one process and nothing here talks to anyone. Gradients are averaged by torch's own
engines (``DistributedDataParallel``, or FSDP2's ``fully_shard``); this module only starts the
process group, shards rows and gathers scores. The processes share one output folder (one
machine, or a shared file system): the process of rank 0 alone writes to it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: The torchrun variables; all three or none.
ENV_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (size 1: a plain single-process run)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> World:
        environ = os.environ if environ is None else environ
        present = [name for name in ENV_VARIABLES if name in environ]
        if not present:
            return cls()
        if len(present) != len(ENV_VARIABLES):
            missing = [name for name in ENV_VARIABLES if name not in environ]
            raise ValueError(
                f"{', '.join(present)} set without {', '.join(missing)}: launch with torchrun, or set none"
            )
        try:
            size, rank, local_rank = (int(environ[name]) for name in ENV_VARIABLES)
        except ValueError:
            raise ValueError(
                "WORLD_SIZE, RANK and LOCAL_RANK must be integers: "
                + ", ".join(f"{name}={environ[name]!r}" for name in ENV_VARIABLES)
            ) from None
        if size < 1 or not 0 <= rank < size or local_rank < 0:
            raise ValueError(
                f"inconsistent torchrun environment: WORLD_SIZE={size} RANK={rank} LOCAL_RANK={local_rank}"
            )
        return cls(size, rank, local_rank)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        """Join the process group: NCCL between GPUs, gloo between CPU processes."""
        import torch.distributed as dist

        if not self.distributed or dist.is_initialized():
            return
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")

    def stop(self) -> None:
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Every process waits here until all have arrived (a no-op alone)."""
        import torch.distributed as dist

        if self.distributed:
            dist.barrier()

    def share(self, n_rows: int) -> list[int]:
        """This process's rows of ``n_rows``: every size-th from its rank, padded with its last row so
        every process has the same count (FSDP needs every process in every forward pass)."""
        rows = list(range(self.rank, n_rows, self.size)) or [n_rows - 1]
        per_process = math.ceil(n_rows / self.size)
        return rows + [rows[-1]] * (per_process - len(rows))

    def gather_shares(self, scores: torch.Tensor, n_rows: int, device: torch.device) -> torch.Tensor:
        """The [n_rows, ...] whole from every process's ``share`` rows (its padding dropped)."""
        import torch.distributed as dist

        if not self.distributed:
            return scores[:n_rows]
        parts = [torch.empty_like(scores, device=device) for _ in range(self.size)]
        dist.all_gather(parts, scores.to(device))
        whole = torch.empty((n_rows, *scores.shape[1:]), dtype=scores.dtype)
        for rank, part in enumerate(parts):
            rows = list(range(rank, n_rows, self.size))
            whole[rows] = part[: len(rows)].cpu()
        return whole

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over the processes (one collective)."""
        import torch.distributed as dist

        if self.distributed:
            values = values.clone()
            dist.all_reduce(values)
        return values


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one process for one optimiser step (dropout masks).

    Seeding every step from (seed, rank, step) makes a resumed run replay the masks it would have
    drawn, with any number of processes before and after the restart, where a saved RNG state
    would belong to one process of one device count.
    """
    return (seed * 1_000_003 + rank) * 1_000_033 + step


def passes(units: Sequence[int], world: World) -> list[int | None]:
    """This process's share of an optimiser step's micro-batches: every size-th from its rank.

    Each process must run as many forward and backward passes as every other (one gradient
    all-reduce per step for DDP, one all-gather per layer and pass for FSDP); a short last step
    pads the shorter shares with None, a pass whose loss counts zero.
    """
    mine: list[int | None] = list(units[world.rank :: world.size])
    count = math.ceil(len(units) / world.size)
    return mine + [None] * (count - len(mine))
