"""Atomic training checkpoints, and resuming from the last complete one.

A checkpoint is a folder ``checkpoint-<step>`` holding everything needed to continue exactly:

    adapter/                  the LoRA weights now (PEFT save_pretrained: a usable adapter)
    best_adapter.safetensors  the trainable weights at the best validation loss so far, if any
    optimizer.safetensors     the optimiser's tensors  } no pickle anywhere: tensors as
    rng.safetensors           torch's RNG states       } safetensors, the rest as JSON
    state.json                step, sampler position, early-stopping state, optimiser and
                              scheduler settings, Python's RNG state; written last

It is written as ``ckpt-tmp``, every file fsynced, then renamed into place (rename is atomic), so
a ``checkpoint-<step>`` folder is complete by construction; a leftover ``ckpt-tmp`` from a killed
run is ignored and replaced. The last ``KEEP_CHECKPOINTS`` are kept.

torch.save would be shorter, but loading it means unpickling, and the project loads nothing that
could execute code (ENGINEERING.md section 7); hence the small (de)serialisers below.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

KEEP_CHECKPOINTS = 2
TMP_NAME = "ckpt-tmp"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under folder, and the folders themselves, to disk."""
    for path in [*sorted(folder.rglob("*")), folder]:
        fsync_path(path)


def publish_folder(tmp: Path, final: Path) -> None:
    """Make tmp (fully written) appear as final in one atomic step, replacing any old final."""
    fsync_tree(tmp)
    if final.exists():
        retired = final.with_name(final.name + ".old")
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(final, retired)
        os.rename(tmp, final)
        shutil.rmtree(retired)
    else:
        os.rename(tmp, final)
    fsync_path(final.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """The trainer's one atomic file write: written beside ``path``, synced, renamed over it.

    The same idea as ``distill_pipeline.core.store.atomic_file``, kept as a copy on purpose: the
    trainer is standalone and imports nothing of the rest of the package (ENGINEERING.md section 1).
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in output_dir.iterdir() if output_dir.exists() else []:
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and (path / "state.json").exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        param_id, name = key.split("/", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{index}"] = state
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor], python_state: list[Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda_states = [tensors[f"cuda/{i}"] for i in range(len(tensors) - 1)]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    output_dir: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    best_weights: dict[str, torch.Tensor] | None,
) -> Path:
    tmp = output_dir / TMP_NAME
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter")
    optimizer_tensors, optimizer_meta = _split_optimizer_state(optimizer.state_dict())
    save_file(optimizer_tensors, tmp / "optimizer.safetensors")
    save_file(_rng_tensors(), tmp / "rng.safetensors")
    if best_weights is not None:
        save_file(best_weights, tmp / "best_adapter.safetensors")
    state = {
        "trainer": trainer_state,
        "optimizer": optimizer_meta,
        "scheduler": scheduler.state_dict(),
        "python_rng": random.getstate(),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    final = output_dir / f"checkpoint-{step}"
    publish_folder(tmp, final)
    for _, old in checkpoints(output_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


def load_checkpoint(
    path: Path, model, optimizer: torch.optim.Optimizer, scheduler
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model, optimiser, scheduler and RNGs in place; return (trainer state, best weights)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    state = json.loads((path / "state.json").read_text())
    device = next(model.parameters()).device
    result = set_peft_model_state_dict(model, load_peft_weights(str(path / "adapter"), device=str(device)))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: checkpoint does not match the model: {result.unexpected_keys[:5]}")
    optimizer.load_state_dict(_join_optimizer_state(load_file(path / "optimizer.safetensors"), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(load_file(path / "rng.safetensors"), state["python_rng"])
    best_path = path / "best_adapter.safetensors"
    best = load_file(best_path) if best_path.exists() else None
    return state["trainer"], best
