"""Train a LoRA student from a TrainSpec: ``python -m distill_pipeline.trainer.train --spec spec.json``.

One straight path, top to bottom:

1. claim the output folder (spec.json; a finished run is returned as is, a different spec refused)
2. seed everything; pick the device (CUDA: bf16 autocast + SDPA; else CPU, with a notice)
3. load the tables, fix the label set, split off validation rows, hash the data
4. load the base model and wrap it with LoRA; choose max_length from the data; tokenise
5. the number of epochs (more on a small set, for min_train_steps); AdamW on the trainable
   parameters, warmup + linear/cosine/constant schedule
6. resume from the last complete checkpoint if there is one
7. loop: length-bucketed micro-batches, gradient accumulation, clipping, a metrics line per
   step, validation every eval_every_steps (early stopping), an atomic checkpoint every
   checkpoint_every_steps
8. export: adapter/ (the best validation loss) with its decision threshold chosen on the
   validation rows, optionally merged/, result.json written last

Outputs in output_dir: adapter/ (adapter_config.json, adapter_model.safetensors, tokenizer,
student.json), spec.json, data_hashes.json, metrics.jsonl, result.json, merged/ if asked.
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
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from distill_pipeline.trainer.data import (
    Example,
    LabelSet,
    choose_max_length,
    length_bucketed_batches,
    load_table,
    sha256_file,
    sha256_rows,
    split_validation,
)
from distill_pipeline.trainer.model import (
    Log,
    add_lora,
    choose_runtime,
    label_log_scores,
    load_base_model,
    load_tokenizer,
    lora_config,
    quiet_loading,
    resolve_base_model,
    target_nll_sum,
    to_device,
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


def claim_output_dir(output_dir: Path, spec: TrainSpec) -> TrainResult | None:
    """Record the spec; return the result of a finished run of the same spec, if there is one."""
    output_dir.mkdir(parents=True, exist_ok=True)
    spec_path = output_dir / SPEC_FILE
    if spec_path.exists():
        if TrainSpec.from_file(spec_path) != spec:
            raise ValueError(f"{output_dir} holds a run of a different spec; use a new output_dir or empty it")
        if (output_dir / RESULT_FILE).exists():
            return TrainResult(**json.loads((output_dir / RESULT_FILE).read_text()))
    else:
        write_lines_atomic(spec_path, spec.to_json().splitlines())
    return None


def planned_epochs(settings: StudentSettings, batches_per_epoch: int) -> int:
    """The spec's epochs, or the fewest more that train at least min_train_steps optimiser steps."""
    if settings.min_train_steps is None:
        return settings.epochs
    # The run trains ceil(epochs * batches_per_epoch / grad_accum_steps) steps; this is the
    # smallest epochs for which that reaches the minimum.
    needed = (settings.min_train_steps - 1) * settings.grad_accum_steps // batches_per_epoch + 1
    return max(settings.epochs, needed)


def trainable_weights(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {name: t.detach().cpu().clone().contiguous() for name, t in get_peft_model_state_dict(model).items()}


def train(spec: TrainSpec, *, log: Log = print, after_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
    """Train the student the spec describes; ``after_checkpoint(step)`` runs after each checkpoint."""
    from peft import set_peft_model_state_dict
    from transformers import get_scheduler, set_seed

    output_dir = Path(spec.output_dir)
    finished = claim_output_dir(output_dir, spec)
    if finished is not None:
        log(f"{output_dir} already holds this run's result; nothing to do")
        return finished

    set_seed(spec.seed)
    runtime = choose_runtime(spec.device, log)
    base_model = resolve_base_model(spec.base_model)

    # ---- data: tables, labels, validation split, hashes
    texts, raw_labels = load_table(spec.train_path, spec.text_column, spec.label_column)
    if spec.validation_path is not None:
        val_texts, val_raw_labels = load_table(spec.validation_path, spec.text_column, spec.label_column)
    else:
        train_rows, val_rows = split_validation(len(texts), spec.validation_fraction, spec.seed)
        val_texts, val_raw_labels = [texts[i] for i in val_rows], [raw_labels[i] for i in val_rows]
        texts, raw_labels = [texts[i] for i in train_rows], [raw_labels[i] for i in train_rows]
    values = spec.label_values if spec.label_values is not None else sorted(set(raw_labels))
    labels = LabelSet(list(values), list(spec.label_names) if spec.label_names else [str(v) for v in values])
    targets = [labels.index_of(y) for y in raw_labels]
    val_targets = [labels.index_of(y) for y in val_raw_labels]
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
        model = load_base_model(spec.student_kind, base_model, labels, runtime)
        student = add_lora(
            model,
            lora_config(spec.student_kind, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.target_modules),
            gradient_checkpointing=spec.gradient_checkpointing,
        )
    position_limit = getattr(model.config, "max_position_embeddings", None) or spec.max_length_cap
    target_modules = sorted(student.peft_config["default"].target_modules)
    codec = make_codec(spec.student_kind, tokenizer, labels, spec.prompt_template, spec.packing)
    max_length = spec.max_length or max(
        codec.min_length,
        choose_max_length(codec.full_lengths(texts, targets), min(spec.max_length_cap, position_limit)),
    )
    train_examples = [Example(ids, t) for ids, t in zip(codec.encode(texts, max_length), targets, strict=True)]
    val_examples = [Example(ids, t) for ids, t in zip(codec.encode(val_texts, max_length), val_targets, strict=True)]
    train_lengths = [codec.length(e) for e in train_examples]
    n_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in student.parameters())
    log(
        f"{spec.student_kind} student on {base_model}: LoRA r={spec.lora_r} on {target_modules}, "
        f"{n_trainable:,} of {n_total:,} parameters trainable; max_length {max_length}; "
        f"{'gradient checkpointing; ' if spec.gradient_checkpointing else ''}"
        f"{len(train_examples)} training rows, {len(val_examples)} validation rows"
    )

    # ---- epochs, optimiser and schedule
    batches_per_epoch = math.ceil(len(train_examples) / spec.batch_size)
    epochs = planned_epochs(spec, batches_per_epoch)
    total_steps = math.ceil(epochs * batches_per_epoch / spec.grad_accum_steps)
    if epochs != spec.epochs:
        log(f"{epochs} epochs instead of {spec.epochs}, for at least min_train_steps={spec.min_train_steps} steps")
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=runtime.device.type == "cuda"
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if spec.lr_schedule == "constant" else spec.lr_schedule,
        optimizer,
        num_warmup_steps=round(spec.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    # ---- resume
    state: dict[str, Any] = {
        "step": 0,
        "best_val_loss": None,
        "best_val_accuracy": None,
        "best_step": None,
        "evals_since_best": 0,
        "tokens": 0,
        "train_seconds": 0.0,
    }
    best_weights: dict[str, torch.Tensor] | None = None
    checkpoint = latest_checkpoint(output_dir)
    resumed_from = None
    if checkpoint is not None:
        state, best_weights = load_checkpoint(checkpoint, student, optimizer, scheduler)
        resumed_from = state["step"]
        log(f"resuming from {checkpoint.name} (step {resumed_from} of {total_steps})")
    metrics = MetricsLog(output_dir / "metrics.jsonl", state["step"])

    def micro_batches(start: int) -> Iterator[tuple[int, list[int]]]:
        """(epoch, example indices) from the start-th micro-batch of the whole run on."""
        epoch, offset = divmod(start, batches_per_epoch)
        for e in range(epoch, epochs):
            for indices in length_bucketed_batches(train_lengths, spec.batch_size, spec.seed, e)[offset:]:
                yield e, indices
            offset = 0

    def validation_scores() -> torch.Tensor:
        student.eval()
        scores = label_log_scores(
            codec, student, val_examples, len(labels.values), max_length, spec.batch_size, runtime
        )
        student.train()
        return scores

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

    # ---- the loop
    stream = micro_batches(state["step"] * spec.grad_accum_steps)
    log_every = max(1, total_steps // LOG_LINES_PER_RUN)
    stopped_early = False
    student.train()
    while state["step"] < total_steps:
        started = time.perf_counter()
        window = list(itertools.islice(stream, spec.grad_accum_steps))
        batches = [codec.collate([train_examples[i] for i in indices], max_length) for _, indices in window]
        # Every target of the window weighs the same, however the micro-batches split them.
        window_targets = sum(int(b["n_targets"]) for b in batches)
        window_tokens = sum(int(b["n_tokens"]) for b in batches)
        loss_sum = 0.0
        for batch in batches:
            batch = to_device(batch, runtime.device)
            with runtime.autocast():
                nll = target_nll_sum(spec.student_kind, student, batch)
            (nll / window_targets).backward()
            loss_sum += nll.item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, spec.max_grad_norm)) if spec.max_grad_norm else None
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        state["step"] += 1
        state["tokens"] += window_tokens
        state["train_seconds"] += elapsed
        step = state["step"]
        record = {
            "step": step,
            "epoch": round(step * spec.grad_accum_steps / batches_per_epoch, 4),
            "loss": loss_sum / window_targets,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": window_tokens,
            "tokens_per_s": window_tokens / elapsed,
        }
        metrics.write(record)
        if step % log_every == 0 or step == total_steps:
            log(
                f"step {step}/{total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                f"lr {lr:.2e} {record['tokens_per_s']:,.0f} tokens/s"
            )

        if (spec.eval_every_steps and step % spec.eval_every_steps == 0) or step == total_steps:
            val = validate()
            metrics.write({"step": step, **val})
            if state["best_val_loss"] is None or val["val_loss"] < state["best_val_loss"]:
                state.update(
                    best_val_loss=val["val_loss"],
                    best_val_accuracy=val["val_accuracy"],
                    best_step=step,
                    evals_since_best=0,
                )
                best_weights = trainable_weights(student)
            else:
                state["evals_since_best"] += 1
            log(f"validation at step {step}: loss {val['val_loss']:.4f} accuracy {val['val_accuracy']:.4f}")
            if spec.early_stopping_patience and state["evals_since_best"] >= spec.early_stopping_patience:
                stopped_early = True
                log(f"early stop: no better validation loss since step {state['best_step']}")
                break

        if spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0 and step < total_steps:
            save_checkpoint(output_dir, step, student, optimizer, scheduler, state, best_weights)
            if after_checkpoint is not None:
                after_checkpoint(step)

    # ---- export: the adapter with the best validation loss, then (optionally) merged weights
    if best_weights is not None and state["best_step"] != state["step"]:
        set_peft_model_state_dict(student, best_weights)
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
    adapter_tmp = output_dir / "adapter-tmp"
    shutil.rmtree(adapter_tmp, ignore_errors=True)
    student.save_pretrained(str(adapter_tmp))
    tokenizer.save_pretrained(str(adapter_tmp))
    meta = student_metadata(spec.student_kind, spec.base_model, labels, max_length, spec.prompt_template, decision)
    write_json_atomic(adapter_tmp / STUDENT_FILE, meta)
    publish_folder(adapter_tmp, output_dir / "adapter")
    merged_dir = None
    if spec.merged_export:
        merged_tmp = output_dir / "merged-tmp"
        shutil.rmtree(merged_tmp, ignore_errors=True)
        student.merge_and_unload().save_pretrained(str(merged_tmp))
        tokenizer.save_pretrained(str(merged_tmp))
        publish_folder(merged_tmp, output_dir / "merged")
        merged_dir = str(output_dir / "merged")

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
    )
    write_json_atomic(output_dir / RESULT_FILE, asdict(result))
    # The run is complete; its checkpoints only served to resume it.
    for _, path in checkpoints(output_dir):
        shutil.rmtree(path)
    log(f"adapter written to {result.adapter_dir} (best validation loss at step {result.best_step})")
    return result


def quiet_progress_bars() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def open_pipes():
    """The Dagster Pipes context when this process was launched through Pipes, else None."""
    try:
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes
    except ImportError:
        return None
    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        return None
    return open_dagster_pipes()


def materialization_metadata(result: TrainResult) -> dict[str, Any]:
    """The result as Pipes metadata: numbers as floats (so the UI charts them), folders as paths."""
    metadata: dict[str, Any] = {
        name: float(value)
        for name, value in asdict(result).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    metadata["stopped_early"] = result.stopped_early
    metadata["target_modules"] = ", ".join(result.target_modules)
    metadata["device"] = result.device
    metadata["adapter_dir"] = {"raw_value": result.adapter_dir, "type": "path"}
    if result.merged_dir:
        metadata["merged_dir"] = {"raw_value": result.merged_dir, "type": "path"}
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", help="a TrainSpec JSON file (under Pipes it may come as the extra 'train_spec')")
    args = parser.parse_args(argv)
    pipes = open_pipes()
    if pipes is not None or not sys.stdout.isatty():
        # Progress bars drawn into a run log or a file are noise; the step lines say the same.
        quiet_progress_bars()
    if pipes is None:
        if args.spec is None:
            parser.error("--spec is required")
        result = train(TrainSpec.from_file(args.spec))
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
