"""The student across several processes: DDP (a whole replica per GPU) or FSDP2 (sharded weights).

Both are torch's own engines; the trainer only chooses one, tells it when to synchronise
gradients (the last micro-batch of an optimiser step), and asks for whole weights and optimiser
state when rank 0 writes a checkpoint.

- ``ddp``: ``DistributedDataParallel`` all-reduces (averages) the gradients of the trainable
  weights in the backward pass of the last micro-batch; every process keeps the whole model.
- ``fsdp``: ``fully_shard`` (FSDP2) on every transformer block (the classes a Hugging Face
  model lists as ``_no_split_modules``) and on the root, so each process holds 1/N of the
  weights, gradients and optimiser state and gathers a block's weights only while it runs. LoRA
  and frozen weights share a block: FSDP2 shards per parameter, so mixed ``requires_grad`` is
  fine, and on a GPU every weight is gathered in the compute dtype (bf16/fp16) while gradients are
  reduced in float32.
"""

from __future__ import annotations

import contextlib

import torch

from distill_pipeline.trainer.distributed import World


def shard_model(student, world: World, mode: str, runtime):
    """The module to run forward passes through: the student wrapped in DDP, or sharded by FSDP in place."""
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(runtime.device.type, (world.size,))
        options: dict = {"mesh": mesh}
        if runtime.autocast_dtype is not None:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=runtime.autocast_dtype, reduce_dtype=torch.float32)
        base = student.get_base_model() if hasattr(student, "get_base_model") else student
        blocks = set(getattr(base, "_no_split_modules", None) or [])
        if not blocks:
            raise ValueError(f"{type(base).__name__} names no transformer blocks (_no_split_modules) to shard")
        for module in list(student.modules()):
            if type(module).__name__ in blocks and module is not student:
                fully_shard(module, **options)
        # The root holds what is left (embeddings, final norm, head) and moves every shard to the device.
        fully_shard(student, **options)
        return student
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=device_ids)


def gradient_sync(model, world: World, *, enabled: bool) -> contextlib.AbstractContextManager:
    """Within it, a backward pass synchronises gradients over the processes only when ``enabled``
    (the last micro-batch of an optimiser step): one all-reduce per step, not per micro-batch."""
    if not world.distributed:
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if enabled else model.no_sync()


def full_optimizer_state(student, optimizer: torch.optim.Optimizer, *, fsdp: bool) -> dict:
    """The optimiser's whole state keyed by parameter name, so a checkpoint resumes under DDP, FSDP or
    one process alike. Under FSDP the shards are gathered (to rank 0, in host memory) and every
    process must call it."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    # A plain optimiser numbers its parameters in the order it was given them: the trainable ones.
    names = [name for name, p in student.named_parameters() if p.requires_grad]
    plain = optimizer.state_dict()
    return {
        "state": {names[index]: values for index, values in plain["state"].items()},
        "param_groups": [group | {"params": [names[i] for i in group["params"]]} for group in plain["param_groups"]],
    }


def load_optimizer_state(student, optimizer: torch.optim.Optimizer, state: dict, *, fsdp: bool) -> None:
    """Put a ``full_optimizer_state`` back (each process takes its shard under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            student, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )
        return
    index = {name: i for i, (name, p) in enumerate((n, p) for n, p in student.named_parameters() if p.requires_grad)}
    optimizer.load_state_dict(
        {
            "state": {index[name]: values for name, values in state["state"].items()},
            "param_groups": [
                group | {"params": [index[name] for name in group["params"]]} for group in state["param_groups"]
            ],
        }
    )
