"""Load a trained student adapter and label texts with it.

    student = load_student("out/adapter")
    labels, scores = student.predict(["some text", ...])

``labels`` are label values; ``scores[i][j]`` is the probability of ``student.labels.values[j]``
for text i: the classifier's softmax for an encoder, and for a decoder the softmax, over the
candidate labels, of the log-likelihood of each label's answer (constrained generation: the
answer is always one of the labels). A two-label student trained with a calibrated decision
threshold labels a text positive when its positive probability reaches that threshold; other
students answer the most probable label.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill_pipeline.trainer.calibration import (
    MIN_PRIOR_ESTIMATE_ROWS,
    apply_threshold,
    estimate_prior,
    shift_probability,
)
from distill_pipeline.trainer.data import DecoderCodec, EncoderCodec, Example, LabelSet
from distill_pipeline.trainer.model import (
    Log,
    Runtime,
    WeightsError,
    check_safetensors,
    choose_runtime,
    label_log_scores,
    load_base_model,
    load_tokenizer,
    quiet_loading,
    resolve_base_model,
)

# Beside adapter_config.json: what the adapter alone does not say (PEFT, vLLM and LoRAX ignore it).
STUDENT_FILE = "student.json"
# The only adapter weights loaded: PEFT would fall back to a pickled adapter_model.bin without it.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# student.json's "weights": a LoRA adapter over the recorded base, or (a full fine-tune) the
# whole model, saved by save_pretrained in the same folder (config.json, *.safetensors).
LORA_WEIGHTS = "lora"
FULL_WEIGHTS = "full"


def make_codec(
    kind: str, tokenizer, labels: LabelSet, prompt_template: str, packing: bool
) -> EncoderCodec | DecoderCodec:
    if kind == "encoder":
        return EncoderCodec(tokenizer)
    return DecoderCodec(tokenizer, prompt_template, labels.names, packing)


#: ``prior="auto"``: the share of positives estimated from the texts being labelled.
AUTO_PRIOR = "auto"


@dataclass(frozen=True)
class DecisionRule:
    """Two-label students: the positive label is chosen when its probability reaches ``threshold``.

    ``train_prior`` is the training rows' share of positives, at which the probabilities are
    fitted; a prediction under another prior shifts them from it (None: an older adapter that did
    not record it, which predicts at its training prior only).
    """

    positive_label: int
    threshold: float
    train_prior: float | None = None


def student_metadata(
    kind: str,
    base_model: str | None,
    labels: LabelSet,
    max_length: int,
    prompt_template: str,
    decision: DecisionRule | None = None,
    *,
    full_model: bool = False,
) -> dict[str, Any]:
    return {
        "student_kind": kind,
        "weights": FULL_WEIGHTS if full_model else LORA_WEIGHTS,
        # As given in the spec: None is the packaged MiniLM, re-checked wherever it is loaded.
        "base_model": base_model,
        "label_values": labels.values,
        "label_names": labels.names,
        "max_length": max_length,
        "prompt_template": prompt_template,
        "decision": None
        if decision is None
        else {
            "positive_label": decision.positive_label,
            "threshold": decision.threshold,
            "train_prior": decision.train_prior,
        },
    }


def decide(labels: LabelSet, probabilities: torch.Tensor, decision: DecisionRule | None) -> list[int]:
    """Label values from [rows, labels] probabilities: argmax, or the two-label threshold rule."""
    if decision is None:
        return [labels.values[i] for i in probabilities.argmax(dim=-1).tolist()]
    positive = labels.index_of(decision.positive_label)
    negative = labels.values[1 - positive]
    return [
        decision.positive_label if apply_threshold(p, decision.threshold) else negative
        for p in probabilities[:, positive].tolist()
    ]


@dataclass
class Student:
    model: Any
    codec: EncoderCodec | DecoderCodec
    labels: LabelSet
    max_length: int
    runtime: Runtime
    decision: DecisionRule | None = None

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> tuple[list[int], list[list[float]]]:
        """(label value, per-label probabilities) for every text, at the training prior."""
        labels, probabilities, _ = self.predict_under_prior(texts, batch_size)
        return labels, probabilities

    def predict_under_prior(
        self, texts: Sequence[str], batch_size: int = 32, prior: float | str | None = None
    ) -> tuple[list[int], list[list[float]], float | None]:
        """Labels and probabilities under a class prior, and the prior used (None: the training prior).

        ``prior`` is the share of positives the texts are expected to have, ``"auto"`` to estimate
        it from them (EM; at least ``MIN_PRIOR_ESTIMATE_ROWS`` texts, else the training prior), or
        None. A student without a two-label decision rule recording its training prior answers at
        its training prior whatever ``prior`` says.
        """
        if not texts:
            return [], [], None
        examples = [Example(ids, 0) for ids in self.codec.encode(texts, self.max_length)]
        log_scores = label_log_scores(
            self.codec, self.model, examples, len(self.labels.values), self.max_length, batch_size, self.runtime
        )
        probabilities = torch.softmax(log_scores, dim=-1)
        rule = self.decision
        used = None
        if rule is not None and rule.train_prior is not None and prior is not None:
            positive = self.labels.index_of(rule.positive_label)
            p_positive = probabilities[:, positive].tolist()
            if prior == AUTO_PRIOR:
                used = estimate_prior(p_positive, rule.train_prior) if len(texts) >= MIN_PRIOR_ESTIMATE_ROWS else None
            else:
                used = float(prior)
            if used is not None:
                shifted = torch.tensor([shift_probability(p, rule.train_prior, used) for p in p_positive])
                probabilities = probabilities.clone()
                probabilities[:, positive] = shifted
                probabilities[:, 1 - positive] = 1.0 - shifted
        return decide(self.labels, probabilities, rule), probabilities.tolist(), used


def load_student(
    adapter_dir: str | Path, *, base_model: str | None = None, device: str = "auto", log: Log = print
) -> Student:
    """A student from an ``adapter/`` folder written by the trainer, ready to predict.

    ``base_model`` overrides the base recorded at training time (e.g. the hub id where the
    trainer used a local copy). The adapter's weights must be ``adapter_model.safetensors`` and
    the base's safetensors too; anything else is a :class:`WeightsError`, raised before loading.
    A full fine-tune's folder holds the whole model instead, loaded from its own safetensors.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / STUDENT_FILE).is_file():
        raise WeightsError(
            f"the adapter folder {adapter_dir} has no {STUDENT_FILE}: it is not an adapter the trainer wrote"
        )
    meta = json.loads((adapter_dir / STUDENT_FILE).read_text())
    if meta.get("weights", LORA_WEIGHTS) == FULL_WEIGHTS:
        labels = _label_set(meta, adapter_dir)
        runtime = choose_runtime(device, log)
        with quiet_loading():
            # load_base_model refuses a folder without readable safetensors.
            model = load_base_model(meta["student_kind"], str(adapter_dir), labels, runtime).eval()
        return _student(model, load_tokenizer(str(adapter_dir)), meta, labels, runtime)
    for name in ("adapter_config.json", ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            why = " (weights load from safetensors only, never from a pickled adapter_model.bin)"
            raise WeightsError(
                f"the adapter folder {adapter_dir} has no {name}: it is not an adapter the trainer wrote"
                + (why if name == ADAPTER_WEIGHTS else "")
            )
    check_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    labels = _label_set(meta, adapter_dir)
    runtime = choose_runtime(device, log)
    base = resolve_base_model(base_model or meta["base_model"])
    tokenizer = load_tokenizer(str(adapter_dir))
    with quiet_loading():
        # The base's classifier head is new here; the adapter's saved head replaces it just below.
        model = load_base_model(meta["student_kind"], base, labels, runtime)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(runtime.device).eval()
    return _student(model, tokenizer, meta, labels, runtime)


def _label_set(meta: dict[str, Any], adapter_dir: Path) -> LabelSet:
    missing = [key for key in ("label_values", "label_names", "student_kind", "prompt_template") if key not in meta]
    if missing:
        raise WeightsError(f"{adapter_dir / STUDENT_FILE} lacks {', '.join(missing)}: it is not one the trainer wrote")
    return LabelSet(list(meta["label_values"]), list(meta["label_names"]))


def _student(model, tokenizer, meta: dict[str, Any], labels: LabelSet, runtime: Runtime) -> Student:
    codec = make_codec(meta["student_kind"], tokenizer, labels, meta["prompt_template"], packing=True)
    rule = meta.get("decision")
    decision = None
    if rule:
        train_prior = rule.get("train_prior")
        decision = DecisionRule(
            int(rule["positive_label"]), float(rule["threshold"]), None if train_prior is None else float(train_prior)
        )
    return Student(model, codec, labels, int(meta["max_length"]), runtime, decision)
