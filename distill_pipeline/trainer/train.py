"""Train a LoRA student from a TrainSpec: ``python -m distill_pipeline.trainer.train --spec spec.json``.

Several GPUs: ``torchrun --nproc-per-node N -m distill_pipeline.trainer.train --spec spec.json``
(the same spec; ``distributed`` picks DDP or FSDP).

One straight path, top to bottom:

1. claim the output folder (spec.json; a finished run is returned as is, a different spec refused)
2. seed everything; pick the device (CUDA: bf16 autocast, fp16 + a gradient scaler where bf16
   is not native, SDPA; else CPU, with a notice); under torchrun join the process group
3. load the tables, fix the label set and the target distributions (soft labels, label
   smoothing), split off validation rows, hash the data
4. load the base model straight onto its device, wrap it with LoRA (or train it whole); choose
   max_length from the data; tokenise; wrap the student in DDP or FSDP under torchrun
5. the number of epochs (more on a small set, for min_train_steps); AdamW on the trainable
   parameters, warmup + linear/cosine/constant schedule
6. resume from the last complete checkpoint if there is one
7. loop: length-bucketed micro-batches, each process a disjoint share of every optimiser step's
   (global batch = batch_size x grad_accum_steps x processes), gradient accumulation, clipping,
   a metrics line per step (read back from the device once per logging window), validation
   every eval_every_steps (early stopping), an atomic checkpoint every checkpoint_every_steps
8. export: adapter/ (the best validation loss) with its decision threshold chosen on the
   validation rows, optionally merged/, result.json written last

Outputs in output_dir: adapter/ (adapter_config.json, adapter_model.safetensors, tokenizer,
student.json; for a full fine-tune config.json and model.safetensors instead of the adapter
files), spec.json, data_hashes.json, metrics.jsonl, result.json, merged/ if asked. Under torchrun
the process of rank 0 alone writes them (and talks to Dagster); the others wait at barriers.
Validation and calibration are sharded over the processes and gathered: FSDP needs every
process in every forward pass anyway, and N processes score N times faster.
Progress goes to Dagster through Pipes when launched by Pipes, else to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distill_pipeline.trainer.calibration import choose_threshold
from distill_pipeline.trainer.checkpoint import (
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    publish_folder,
    read_trainer_state,
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from distill_pipeline.trainer.data import (
    Example,
    LabelSet,
    choose_max_length,
    length_bucketed_batches,
    load_soft_labels,
    load_table,
    sha256_file,
    sha256_rows,
    split_validation,
    target_distributions,
)
from distill_pipeline.trainer.distributed import World, passes, step_seed
from distill_pipeline.trainer.model import (
    Log,
    add_lora,
    choose_runtime,
    full_student,
    label_log_scores,
    load_base_model,
    load_tokenizer,
    load_trainable_state,
    lora_config,
    quiet_loading,
    resolve_base_model,
    target_nll_sum,
    to_device,
    trainable_named_parameters,
    trainable_state,
)
from distill_pipeline.trainer.parallel import (
    full_optimizer_state,
    gradient_sync,
    load_optimizer_state,
    shard_model,
)
from distill_pipeline.trainer.predict import STUDENT_FILE, DecisionRule, decide, make_codec, student_metadata
from distill_pipeline.trainer.spec import StudentSettings, TrainSpec

RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"
LOG_LINES_PER_RUN = 20


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str
    merged_dir: str | None
    steps: int
    total_steps: int
    best_step: int | None
    val_loss: float | None
    val_accuracy: float | None
    stopped_early: bool
    resumed_from_step: int | None
    max_length: int
    target_modules: list[str]
    train_rows: int
    validation_rows: int
    train_tokens: int
    train_tokens_per_s: float
    device: str
    # Two-label students with calibrate_threshold: the cut-off on P(positive) chosen on the
    # validation rows, and the validation accuracy under it (optimistic: chosen on those rows).
    decision_threshold: float | None = None
    val_accuracy_calibrated: float | None = None
    # The processes that trained it (torchrun's WORLD_SIZE), how ("ddp", "fsdp"; None alone), and
    # the examples per optimiser step: batch_size x grad_accum_steps x processes.
    world_size: int = 1
    distributed: str | None = None
    global_batch_size: int | None = None
    full_finetune: bool = False


class MetricsLog:
    """metrics.jsonl, one JSON object per line.

    On resume, the lines written after the checkpoint (and a line cut short by a kill) are
    dropped, so the file always reads as one uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                if json.loads(line)["step"] <= resume_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        write_lines_atomic(path, kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def write_lines_atomic(path: Path, lines: list[str]) -> None:
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def claim_output_dir(output_dir: Path, spec: TrainSpec, *, write: bool = True) -> TrainResult | None:
    """Record the spec; return the result of a finished run of the same spec, if there is one.

    ``write=False`` (every process of a torchrun but rank 0) checks without writing anything.
    """
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
    spec_path = output_dir / SPEC_FILE
    if spec_path.exists():
        if TrainSpec.from_file(spec_path) != spec:
            raise ValueError(f"{output_dir} holds a run of a different spec; use a new output_dir or empty it")
        if (output_dir / RESULT_FILE).exists():
            return TrainResult(**json.loads((output_dir / RESULT_FILE).read_text()))
    elif write:
        write_lines_atomic(spec_path, spec.to_json().splitlines())
    return None


def planned_epochs(settings: StudentSettings, batches_per_epoch: int, micro_batches_per_step: int | None = None) -> int:
    """The spec's epochs, or the fewest more that train at least min_train_steps optimiser steps.

    ``micro_batches_per_step``: grad_accum_steps times the processes (grad_accum_steps alone by default).
    """
    if settings.min_train_steps is None:
        return settings.epochs
    per_step = micro_batches_per_step or settings.grad_accum_steps
    # The run trains ceil(epochs * batches_per_epoch / per_step) steps; this is the smallest
    # epochs for which that reaches the minimum.
    needed = (settings.min_train_steps - 1) * per_step // batches_per_epoch + 1
    return max(settings.epochs, needed)


def train(spec: TrainSpec, *, log: Log = print, after_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
    """Train the student the spec describes; ``after_checkpoint(step)`` runs after each checkpoint.

    Under torchrun (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in the environment) every process calls
    this; rank 0 logs and writes, and every process returns the same result.
    """
    world = World.from_env()
    if not world.is_main:
        log = _silent
    runtime = choose_runtime(spec.device, log, local_rank=world.local_rank if world.distributed else None)
    world.start(runtime.device)
    try:
        return _train(spec, world, runtime, log, after_checkpoint)
    finally:
        world.stop()


def _silent(_message: str) -> None:
    pass


def _train(
    spec: TrainSpec, world: World, runtime, log: Log, after_checkpoint: Callable[[int], None] | None
) -> TrainResult:
    from transformers import get_scheduler, set_seed

    output_dir = Path(spec.output_dir)
    # Rank 0 records the spec; the others check it once it is there.
    finished = claim_output_dir(output_dir, spec) if world.is_main else None
    world.barrier()
    if not world.is_main:
        finished = claim_output_dir(output_dir, spec, write=False)
    if finished is not None:
        log(f"{output_dir} already holds this run's result; nothing to do")
        return finished
    fsdp = world.distributed and spec.distributed == "fsdp"
    if fsdp and spec.merged_export:
        raise ValueError(
            "merged_export needs the whole model in one process; it is not available with distributed='fsdp'"
        )

    set_seed(spec.seed)
    base_model = resolve_base_model(spec.base_model)

    # ---- data: tables, labels, target distributions, validation split, hashes
    texts, raw_labels = load_table(spec.train_path, spec.text_column, spec.label_column)
    soft = load_soft_labels(spec.train_path, spec.soft_label_column) if spec.soft_label_column else None
    if spec.validation_path is not None:
        val_texts, val_raw_labels = load_table(spec.validation_path, spec.text_column, spec.label_column)
    else:
        train_rows, val_rows = split_validation(len(texts), spec.validation_fraction, spec.seed)
        val_texts, val_raw_labels = [texts[i] for i in val_rows], [raw_labels[i] for i in val_rows]
        texts, raw_labels = [texts[i] for i in train_rows], [raw_labels[i] for i in train_rows]
        soft = [soft[i] for i in train_rows] if soft is not None else None
    values = spec.label_values if spec.label_values is not None else sorted(set(raw_labels))
    labels = LabelSet(list(values), list(spec.label_names) if spec.label_names else [str(v) for v in values])
    targets = [labels.index_of(y) for y in raw_labels]
    val_targets = [labels.index_of(y) for y in val_raw_labels]
    distributions: list[tuple[float, ...] | None] = [None] * len(targets)
    if soft is not None or spec.label_smoothing > 0.0:
        distributions = [
            tuple(q)
            for q in target_distributions(
                targets,
                len(labels.values),
                soft=soft,
                positive=labels.index_of(spec.positive_label) if spec.positive_label is not None else None,
                soft_weight=spec.soft_label_weight,
                smoothing=spec.label_smoothing,
            )
        ]
    if world.is_main:
        data_files = {"train": spec.train_path} | ({"validation": spec.validation_path} if spec.validation_path else {})
        write_json_atomic(
            output_dir / "data_hashes.json",
            {
                "files": {role: {"path": str(path), "sha256": sha256_file(path)} for role, path in data_files.items()},
                "train": {"rows": len(texts), "sha256": sha256_rows(texts, raw_labels)},
                "validation": {"rows": len(val_texts), "sha256": sha256_rows(val_texts, val_raw_labels)},
            },
        )

    # ---- model and tokenised data
    tokenizer = load_tokenizer(base_model)
    with quiet_loading():
        # FSDP: each process reads the base into host memory and keeps only its shard on its GPU.
        model = load_base_model(
            spec.student_kind,
            base_model,
            labels,
            runtime,
            # A full fine-tune keeps float32 master weights; autocast still computes in bf16.
            dtype=torch.float32 if spec.full_finetune else None,
            device=torch.device("cpu") if fsdp else None,
        )
        if spec.full_finetune:
            student = full_student(model, gradient_checkpointing=spec.gradient_checkpointing)
        else:
            student = add_lora(
                model,
                lora_config(spec.student_kind, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.target_modules),
                gradient_checkpointing=spec.gradient_checkpointing,
            )
    position_limit = getattr(model.config, "max_position_embeddings", None) or spec.max_length_cap
    # PEFT resolves "all-linear" to every module's full name; the layer names say the same, once.
    target_modules = (
        []
        if spec.full_finetune
        else sorted({name.rsplit(".", 1)[-1] for name in student.peft_config["default"].target_modules})
    )
    codec = make_codec(spec.student_kind, tokenizer, labels, spec.prompt_template, spec.packing)
    max_length = spec.max_length or max(
        codec.min_length,
        choose_max_length(codec.full_lengths(texts, targets), min(spec.max_length_cap, position_limit)),
    )
    train_examples = [
        Example(ids, t, q) for ids, t, q in zip(codec.encode(texts, max_length), targets, distributions, strict=True)
    ]
    val_examples = [Example(ids, t) for ids, t in zip(codec.encode(val_texts, max_length), val_targets, strict=True)]
    train_lengths = [codec.length(e) for e in train_examples]
    n_trainable = sum(p.numel() for _, p in trainable_named_parameters(student))
    n_total = sum(p.numel() for p in student.parameters())
    forward_model = shard_model(student, world, spec.distributed, runtime) if world.distributed else student
    what = "every weight trained" if spec.full_finetune else f"LoRA r={spec.lora_r} on {target_modules}"
    targets_note = ""
    if soft is not None:
        targets_note += f"soft labels from {spec.soft_label_column!r} (weight {spec.soft_label_weight}); "
    if spec.label_smoothing:
        targets_note += f"label smoothing {spec.label_smoothing}; "
    log(
        f"{spec.student_kind} student on {base_model}: {what}, "
        f"{n_trainable:,} of {n_total:,} parameters trainable; max_length {max_length}; "
        f"{'gradient checkpointing; ' if spec.gradient_checkpointing else ''}{targets_note}"
        f"{len(train_examples)} training rows, {len(val_examples)} validation rows"
    )

    # ---- the global batch: every optimiser step takes micro_batches_per_step micro-batches of
    # batch_size examples, each process a disjoint share. A resumed run keeps the global batch of
    # the run that wrote its checkpoint, whatever number of processes resumes it.
    checkpoint = latest_checkpoint(output_dir)
    trained_by = read_trainer_state(checkpoint).get("world_size", 1) if checkpoint is not None else world.size
    micro_batches_per_step = spec.grad_accum_steps * trained_by
    if micro_batches_per_step % world.size:
        raise ValueError(
            f"{checkpoint} was written by {trained_by} process(es) at {micro_batches_per_step} micro-batches per step, "
            f"which {world.size} processes cannot share evenly: resume with a number of processes that divides "
            f"{micro_batches_per_step}, or empty {output_dir} to start over"
        )
    global_batch_size = spec.batch_size * micro_batches_per_step
    batches_per_epoch = math.ceil(len(train_examples) / spec.batch_size)
    epochs = planned_epochs(spec, batches_per_epoch, micro_batches_per_step)
    total_steps = math.ceil(epochs * batches_per_epoch / micro_batches_per_step)
    if world.distributed or spec.grad_accum_steps > 1:
        log(
            f"global batch {global_batch_size} examples = batch_size {spec.batch_size} x "
            f"{micro_batches_per_step // trained_by} accumulated x {trained_by} process(es)"
            + (f", {world.size} processes now ({spec.distributed})" if world.distributed else "")
        )
    if epochs != spec.epochs:
        log(f"{epochs} epochs instead of {spec.epochs}, for at least min_train_steps={spec.min_train_steps} steps")

    # ---- optimiser and schedule
    trainable = [p for _, p in trainable_named_parameters(student)]
    optimizer = torch.optim.AdamW(
        trainable, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=runtime.device.type == "cuda"
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if spec.lr_schedule == "constant" else spec.lr_schedule,
        optimizer,
        num_warmup_steps=round(spec.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.needs_grad_scaler else None

    # ---- resume
    state: dict[str, Any] = {
        "step": 0,
        "best_val_loss": None,
        "best_val_accuracy": None,
        "best_step": None,
        "evals_since_best": 0,
        "tokens": 0,
        "train_seconds": 0.0,
        "world_size": trained_by,
    }
    best_weights: dict[str, torch.Tensor] | None = None
    resumed_from = None
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint)
        load_trainable_state(student, saved.weights)
        load_optimizer_state(student, optimizer, saved.optimizer_state, fsdp=fsdp)
        scheduler.load_state_dict(saved.scheduler_state)
        if scaler is not None and saved.scaler_state:
            scaler.load_state_dict(saved.scaler_state)
        state, best_weights = saved.trainer_state, saved.best_weights
        state.setdefault("world_size", trained_by)
        resumed_from = state["step"]
        log(f"resuming from {checkpoint.name} (step {resumed_from} of {total_steps})")
    metrics = MetricsLog(output_dir / "metrics.jsonl", state["step"]) if world.is_main else None

    def micro_batches(start: int) -> Iterator[list[int]]:
        """Example indices of every micro-batch from the start-th of the whole run on."""
        epoch, offset = divmod(start, batches_per_epoch)
        for e in range(epoch, epochs):
            yield from length_bucketed_batches(train_lengths, spec.batch_size, spec.seed, e)[offset:]
            offset = 0

    def validation_scores() -> torch.Tensor:
        """[validation rows, labels] log-scores, each process scoring its share."""
        student.eval()
        share = world.share(len(val_examples))
        scores = label_log_scores(
            codec,
            forward_model if fsdp else student,
            [val_examples[i] for i in share],
            len(labels.values),
            max_length,
            spec.batch_size,
            runtime,
        )
        student.train()
        return world.gather_shares(scores, len(val_examples), runtime.device)

    def validate() -> dict[str, float]:
        scores = validation_scores()
        truth = torch.tensor(val_targets)
        true_scores = scores[torch.arange(len(truth)), truth]
        # Loss per target, as in training: per row (encoder) or per answer token (decoder).
        n_targets = len(truth) if spec.student_kind == "encoder" else sum(len(codec.answers[t]) for t in val_targets)
        return {
            "val_loss": float(-true_scores.sum() / n_targets),
            "val_accuracy": float((scores.argmax(dim=-1) == truth).float().mean()),
        }

    # Steps whose loss and gradient norm are still on the device: read back together, once per
    # logging window, so the host never waits for the GPU inside the window.
    pending: list[dict[str, Any]] = []
    window_started = time.perf_counter()

    def flush() -> None:
        nonlocal window_started
        if not pending:
            return
        losses = world.sum(torch.stack([r.pop("loss_sum") for r in pending]))
        norms = [r.pop("grad_norm") for r in pending]
        read = torch.stack([losses.float(), *([torch.stack(norms).float()] if norms[0] is not None else [])]).tolist()
        elapsed = time.perf_counter() - window_started
        tokens = sum(r["tokens"] for r in pending)
        state["train_seconds"] += elapsed
        for i, record in enumerate(pending):
            record["loss"] = read[0][i] / record.pop("targets")
            record["grad_norm"] = read[1][i] if len(read) > 1 else None
            record["tokens_per_s"] = tokens / elapsed
            if metrics is not None:
                metrics.write(record)
        last = pending[-1]
        log(
            f"step {last['step']}/{total_steps} epoch {last['epoch']:.2f} loss {last['loss']:.4f} "
            f"lr {last['lr']:.2e} {last['tokens_per_s']:,.0f} tokens/s"
        )
        pending.clear()
        window_started = time.perf_counter()

    # ---- the loop
    stream = micro_batches(state["step"] * micro_batches_per_step)
    log_every = max(1, total_steps // LOG_LINES_PER_RUN)
    stopped_early = False
    student.train()
    while state["step"] < total_steps:
        step = state["step"] + 1
        # Dropout masks from (seed, rank, step): the same after a resume, with any number of processes.
        torch.manual_seed(step_seed(spec.seed, world.rank, step))
        window = list(itertools.islice(stream, micro_batches_per_step))
        window_examples = [train_examples[i] for indices in window for i in indices]
        # Every target of the global window weighs the same, however processes and micro-batches
        # split them; DDP and FSDP average gradients over the processes, hence the world size.
        window_targets = sum(codec.target_count(e) for e in window_examples)
        window_tokens = sum(codec.length(e) for e in window_examples)
        loss_scale = world.size / window_targets
        my_passes = passes(range(len(window)), world)
        loss_sum = torch.zeros((), device=runtime.device)
        for n, position in enumerate(my_passes):
            # A process with no micro-batch left in a short last step still takes part in the
            # collectives, on a micro-batch whose loss counts zero.
            indices = window[position if position is not None else 0]
            batch = to_device(codec.collate([train_examples[i] for i in indices], max_length), runtime.device)
            with gradient_sync(forward_model, world, enabled=n == len(my_passes) - 1):
                with runtime.autocast():
                    nll = target_nll_sum(spec.student_kind, forward_model, batch)
                if position is None:
                    nll = nll * 0.0
                loss = nll * loss_scale
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += nll.detach().float()
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = None
        if spec.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, spec.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            grad_norm = grad_norm.detach()
        lr = scheduler.get_last_lr()[0]
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        state["tokens"] += window_tokens
        pending.append(
            {
                "step": step,
                "epoch": round(step * micro_batches_per_step / batches_per_epoch, 4),
                "loss_sum": loss_sum,
                "targets": window_targets,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": window_tokens,
            }
        )
        evaluate = bool(spec.eval_every_steps and step % spec.eval_every_steps == 0) or step == total_steps
        save = bool(spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0 and step < total_steps)
        if step % log_every == 0 or evaluate or save or step == total_steps:
            flush()

        if evaluate:
            val = validate()
            if metrics is not None:
                metrics.write({"step": step, **val})
            if state["best_val_loss"] is None or val["val_loss"] < state["best_val_loss"]:
                state.update(
                    best_val_loss=val["val_loss"],
                    best_val_accuracy=val["val_accuracy"],
                    best_step=step,
                    evals_since_best=0,
                )
                best_weights = trainable_state(student)
            else:
                state["evals_since_best"] += 1
            log(f"validation at step {step}: loss {val['val_loss']:.4f} accuracy {val['val_accuracy']:.4f}")
            if spec.early_stopping_patience and state["evals_since_best"] >= spec.early_stopping_patience:
                stopped_early = True
                log(f"early stop: no better validation loss since step {state['best_step']}")
                break

        if save:
            weights = trainable_state(student)
            optimizer_state = full_optimizer_state(student, optimizer, fsdp=fsdp)
            if world.is_main:
                save_checkpoint(
                    output_dir,
                    step,
                    weights,
                    optimizer_state,
                    scheduler.state_dict(),
                    state,
                    best_weights,
                    scaler.state_dict() if scaler is not None else None,
                )
            # The checkpoint is in place (or, after a kill, absent) before any process goes on.
            world.barrier()
            if after_checkpoint is not None:
                after_checkpoint(step)
        if evaluate or save:
            window_started = time.perf_counter()
    flush()

    # ---- export: the weights with the best validation loss, then (optionally) merged weights
    if best_weights is not None and state["best_step"] != state["step"]:
        load_trainable_state(student, best_weights)
    decision = None
    calibrated_accuracy = None
    if spec.calibrate_threshold and spec.positive_label is not None and val_examples:
        probabilities = torch.softmax(validation_scores(), dim=-1)
        positive = labels.index_of(spec.positive_label)
        threshold = choose_threshold(probabilities[:, positive].tolist(), [t == positive for t in val_targets])
        # The share the probabilities are fitted at, kept so a prediction can shift them to traffic's.
        train_prior = sum(t == positive for t in targets) / max(len(targets), 1)
        decision = DecisionRule(spec.positive_label, threshold, train_prior)
        predicted = decide(labels, probabilities, decision)
        calibrated_accuracy = sum(p == y for p, y in zip(predicted, val_raw_labels, strict=True)) / len(predicted)
        log(
            f"decision threshold {threshold:.3f} on P({labels.names[positive]}): "
            f"validation accuracy {calibrated_accuracy:.4f} (argmax: {state['best_val_accuracy']})"
        )
    final_weights = trainable_state(student) if fsdp else None
    merged_dir = str(output_dir / "merged") if spec.merged_export else None
    if world.is_main:
        adapter_tmp = output_dir / "adapter-tmp"
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        # Under FSDP the weights are shards; the gathered ones are saved instead.
        student.save_pretrained(str(adapter_tmp), **({"state_dict": final_weights} if fsdp else {}))
        tokenizer.save_pretrained(str(adapter_tmp))
        meta = student_metadata(
            spec.student_kind,
            spec.base_model,
            labels,
            max_length,
            spec.prompt_template,
            decision,
            full_model=spec.full_finetune,
        )
        write_json_atomic(adapter_tmp / STUDENT_FILE, meta)
        publish_folder(adapter_tmp, output_dir / "adapter")
        if spec.merged_export:
            merged_tmp = output_dir / "merged-tmp"
            shutil.rmtree(merged_tmp, ignore_errors=True)
            student.merge_and_unload().save_pretrained(str(merged_tmp))
            tokenizer.save_pretrained(str(merged_tmp))
            publish_folder(merged_tmp, output_dir / "merged")

    result = TrainResult(
        output_dir=str(output_dir),
        adapter_dir=str(output_dir / "adapter"),
        merged_dir=merged_dir,
        steps=state["step"],
        total_steps=total_steps,
        best_step=state["best_step"],
        val_loss=state["best_val_loss"],
        val_accuracy=state["best_val_accuracy"],
        stopped_early=stopped_early,
        resumed_from_step=resumed_from,
        max_length=max_length,
        target_modules=target_modules,
        train_rows=len(train_examples),
        validation_rows=len(val_examples),
        train_tokens=state["tokens"],
        train_tokens_per_s=state["tokens"] / state["train_seconds"] if state["train_seconds"] else 0.0,
        device=str(runtime.device),
        decision_threshold=decision.threshold if decision else None,
        val_accuracy_calibrated=calibrated_accuracy,
        world_size=world.size,
        distributed=spec.distributed if world.distributed else None,
        global_batch_size=global_batch_size,
        full_finetune=spec.full_finetune,
    )
    if world.is_main:
        write_json_atomic(output_dir / RESULT_FILE, asdict(result))
        # The run is complete; its checkpoints only served to resume it.
        for _, path in checkpoints(output_dir):
            shutil.rmtree(path)
        log(f"adapter written to {result.adapter_dir} (best validation loss at step {result.best_step})")
    world.barrier()
    return result


def quiet_progress_bars() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def launched_by_pipes() -> bool:
    """Whether this process was launched through Dagster Pipes (its context is in the environment)."""
    try:
        from dagster_pipes import PipesEnvVarParamsLoader
    except ImportError:
        return False
    return PipesEnvVarParamsLoader().is_dagster_pipes_process()


def open_pipes():
    """The Dagster Pipes context when this process was launched through Pipes, else None."""
    if not launched_by_pipes():
        return None
    from dagster_pipes import open_dagster_pipes

    return open_dagster_pipes()


def materialization_metadata(result: TrainResult) -> dict[str, Any]:
    """The result as Pipes metadata: numbers as floats (so the UI charts them), folders as paths."""
    metadata: dict[str, Any] = {
        name: float(value)
        for name, value in asdict(result).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    metadata["stopped_early"] = result.stopped_early
    metadata["full_finetune"] = result.full_finetune
    metadata["distributed"] = result.distributed or "single process"
    metadata["target_modules"] = ", ".join(result.target_modules)
    metadata["device"] = result.device
    metadata["adapter_dir"] = {"raw_value": result.adapter_dir, "type": "path"}
    if result.merged_dir:
        metadata["merged_dir"] = {"raw_value": result.merged_dir, "type": "path"}
    return metadata


def pipes_extra(name: str) -> Any:
    """An extra of the Pipes context, read without opening the message channel (which rank 0 owns)."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as context:
        return context["extras"][name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", help="a TrainSpec JSON file (under Pipes it may come as the extra 'train_spec')")
    args = parser.parse_args(argv)
    world = World.from_env()
    # Under torchrun only rank 0 talks to Dagster: one "opened", one materialisation, one "closed".
    pipes = open_pipes() if world.is_main else None
    if pipes is not None or not sys.stdout.isatty() or not world.is_main:
        # Progress bars drawn into a run log or a file are noise; the step lines say the same.
        quiet_progress_bars()
    if pipes is None:
        if args.spec is not None:
            spec = TrainSpec.from_file(args.spec)
        elif not world.is_main and launched_by_pipes():
            spec = TrainSpec.from_json(json.dumps(pipes_extra("train_spec")))
        else:
            parser.error("--spec is required")
        result = train(spec)
        if world.is_main:
            print(json.dumps(asdict(result), indent=2))
        return 0
    with pipes:
        if args.spec is not None:
            spec = TrainSpec.from_file(args.spec)
        else:
            spec = TrainSpec.from_json(json.dumps(pipes.get_extra("train_spec")))
        result = train(spec, log=pipes.log.info)
        if pipes.is_asset_step and len(pipes.asset_keys) == 1:
            pipes.report_asset_materialization(metadata=materialization_metadata(result))
        else:
            pipes.report_custom_message(asdict(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
