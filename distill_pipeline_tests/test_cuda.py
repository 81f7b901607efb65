"""The trainer on CUDA: bf16 weights loaded on the device, the fp16 + gradient-scaler path,
gradient checkpointing with LoRA, and two-GPU DDP and FSDP runs.

Every test is marked ``gpu``: on a machine without a CUDA GPU they skip (the one skip CI
allows); ``bench/device_check.py`` runs them on a GPU machine (``pytest -m gpu``).
"""

# The fixtures tiny_llama and decoder_data come from test_trainer.py, imported by name so that
# pytest finds them; their parameters therefore shadow the imports (F811) by design.
# ruff: noqa: F811

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from distill_pipeline.trainer import model as trainer_model  # noqa: E402
from distill_pipeline.trainer.data import LabelSet  # noqa: E402
from distill_pipeline.trainer.predict import load_student  # noqa: E402
from distill_pipeline.trainer.train import train  # noqa: E402
from distill_pipeline_tests.test_distributed import assert_same_adapter, torchrun, write_spec  # noqa: E402
from distill_pipeline_tests.test_trainer import (  # noqa: E402, F401  (fixtures used by name)
    LABEL_NAMES,
    decoder_data,
    decoder_spec,
    quiet,
    read_metrics,
    tiny_llama,
)

pytestmark = pytest.mark.gpu


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run) if "loss" in m]


def test_the_base_loads_straight_onto_the_gpu_in_its_compute_dtype(tiny_llama: Path) -> None:
    messages: list[str] = []
    runtime = trainer_model.choose_runtime("cuda", messages.append)
    expected = torch.bfloat16 if trainer_model.bf16_is_native() else torch.float16
    assert runtime.autocast_dtype == expected and runtime.device.type == "cuda"
    assert "bf16 autocast" in messages[0] or "gradient scaler" in messages[0]
    torch.cuda.reset_peak_memory_stats()
    model = trainer_model.load_base_model("decoder", str(tiny_llama), LabelSet([0, 1], LABEL_NAMES), runtime)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {expected}
    # The weights on the GPU in bf16/fp16 take no more than half of their float32 size.
    float32_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert torch.cuda.max_memory_allocated() <= float32_bytes / 2 + (1 << 20)


def test_a_decoder_trains_in_bf16_on_the_gpu_and_predicts(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    result = train(decoder_spec(tiny_llama, decoder_data, tmp_path / "run", epochs=3), log=quiet)
    assert result.device.startswith("cuda") and result.train_tokens_per_s > 0
    run_losses = losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in run_losses) and sum(run_losses[-3:]) < sum(run_losses[:3])
    student = load_student(tmp_path / "run" / "adapter", log=quiet)
    labels, _ = student.predict(["this article is stupid", "thanks for the edit"])
    assert set(labels) <= {0, 1}


def test_fp16_trains_through_a_gradient_scaler_where_bf16_is_not_native(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_model, "bf16_is_native", lambda: False)
    steps: list[float] = []
    original_update = torch.amp.GradScaler.update

    def recorded_update(self, *args, **kwargs):
        steps.append(self.get_scale())
        return original_update(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "update", recorded_update)
    messages: list[str] = []
    spec = decoder_spec(tiny_llama, decoder_data, tmp_path / "run", epochs=1, checkpoint_every_steps=6)
    result = train(spec, log=messages.append)
    assert any("fp16 autocast with a gradient scaler" in m for m in messages)
    assert len(steps) == result.steps == 12 and all(s > 0 for s in steps)
    assert all(math.isfinite(x) for x in losses(tmp_path / "run"))
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # LoRA B starts at zero: a scaler that skipped every step would leave it there.
    assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)


def test_gradient_checkpointing_with_lora_trains_the_same_curve_on_the_gpu(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = {"epochs": 1, "eval_every_steps": None, "lora_dropout": 0.1}
    plain = train(decoder_spec(tiny_llama, decoder_data, tmp_path / "plain", **settings), log=quiet)
    torch.cuda.reset_peak_memory_stats()
    checkpointed = train(
        decoder_spec(tiny_llama, decoder_data, tmp_path / "checkpointed", gradient_checkpointing=True, **settings),
        log=quiet,
    )
    assert checkpointed.steps == plain.steps
    # bf16 sums in another order in the recompute: close, not equal.
    assert losses(tmp_path / "checkpointed") == pytest.approx(losses(tmp_path / "plain"), rel=2e-2)
    weights = load_file(tmp_path / "checkpointed" / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)


# Without CUDA the `gpu` marker skips it (with the reason CI allows); with one GPU this says why.
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs on one machine"
)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gpus_train_the_adapter_one_gpu_trains_at_the_same_global_batch(
    mode: str, tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = {"epochs": 1, "lora_dropout": 0.0, "eval_every_steps": 3, "checkpoint_every_steps": 2}
    spec = decoder_spec(tiny_llama, decoder_data, tmp_path / "two", distributed=mode, **settings)
    process = torchrun(write_spec(spec, tmp_path / "spec.json"))
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert result["world_size"] == 2 and result["distributed"] == mode and result["device"] == "cuda:0"
    alone = train(dataclasses.replace(spec, grad_accum_steps=2, output_dir=str(tmp_path / "one")), log=quiet)
    assert alone.global_batch_size == result["global_batch_size"] == 16
    # bf16 compute, and NCCL sums in its own order: close, not equal.
    assert_same_adapter(tmp_path / "two", tmp_path / "one", atol=5e-3)
