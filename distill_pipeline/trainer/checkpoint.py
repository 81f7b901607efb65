"""Atomic training checkpoints, and resuming from the last complete one.

A checkpoint is a folder ``checkpoint-<step>`` holding everything needed to continue exactly:

    weights.safetensors       the trainable weights now, by parameter name (LoRA and head, or
                              every weight of a full fine-tune)
    best.safetensors          the trainable weights at the best validation loss so far, if any
    optimizer.safetensors     the optimiser's tensors (no pickle anywhere: tensors as
                              safetensors, the rest as JSON)
    state.json                step, early-stopping state, the number of processes that wrote it,
                              optimiser, scheduler and gradient-scaler settings; written last

No RNG state is kept: the trainer seeds each optimiser step from (seed, rank, step), so a resumed
run draws the same dropout masks whatever number of processes wrote the checkpoint. Under
torchrun the process of rank 0 writes it, from weights gathered from every process, and the
others wait at a barrier until it is in place.

It is written as ``ckpt-tmp``, every file fsynced, then renamed into place (rename is atomic), so
a ``checkpoint-<step>`` folder is complete by construction; a leftover ``ckpt-tmp`` from a killed
run is ignored and replaced. The last ``KEEP_CHECKPOINTS`` are kept.

torch.save would be shorter, but loading it means unpickling, and the project loads nothing that
could execute code (ENGINEERING.md section 7); hence the small (de)serialisers below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

KEEP_CHECKPOINTS = 2
TMP_NAME = "ckpt-tmp"
WEIGHTS_FILE = "weights.safetensors"
BEST_FILE = "best.safetensors"
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
        # state.json is written last, so its presence marks a complete checkpoint; one without
        # weights.safetensors is of an older layout and is not resumed from.
        if match and path.is_dir() and (path / "state.json").exists() and (path / WEIGHTS_FILE).exists():
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
    # Parameters are numbered by a plain optimiser's state_dict, named by FSDP's full one.
    def key_of(param_id: str) -> int | str:
        return int(param_id) if param_id.isdigit() else param_id

    state: dict[int | str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        param_id, name = key.split("/", 1)
        state.setdefault(key_of(param_id), {})[name] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(key_of(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    output_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    trainer_state: dict[str, Any],
    best_weights: dict[str, torch.Tensor] | None,
    scaler_state: dict[str, Any] | None = None,
) -> Path:
    tmp = output_dir / TMP_NAME
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / WEIGHTS_FILE)
    optimizer_tensors, optimizer_meta = _split_optimizer_state(optimizer_state)
    save_file(optimizer_tensors, tmp / "optimizer.safetensors")
    if best_weights is not None:
        save_file(best_weights, tmp / BEST_FILE)
    state = {
        "trainer": trainer_state,
        "optimizer": optimizer_meta,
        "scheduler": scheduler_state,
        "scaler": scaler_state,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    final = output_dir / f"checkpoint-{step}"
    publish_folder(tmp, final)
    for _, old in checkpoints(output_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


@dataclass
class Checkpoint:
    trainer_state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    best_weights: dict[str, torch.Tensor] | None
    scaler_state: dict[str, Any] | None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer's own state in a checkpoint (step, processes, early stopping), without its tensors."""
    return json.loads((path / "state.json").read_text())["trainer"]


def load_checkpoint(path: Path) -> Checkpoint:
    """Everything a checkpoint holds, tensors on the CPU; the caller puts them in place."""
    state = json.loads((path / "state.json").read_text())
    best_path = path / BEST_FILE
    return Checkpoint(
        trainer_state=state["trainer"],
        weights=load_file(path / WEIGHTS_FILE),
        optimizer_state=_join_optimizer_state(load_file(path / "optimizer.safetensors"), state["optimizer"]),
        scheduler_state=state["scheduler"],
        best_weights=load_file(best_path) if best_path.exists() else None,
        scaler_state=state.get("scaler"),
    )
