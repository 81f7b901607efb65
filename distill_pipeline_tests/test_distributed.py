"""The trainer under torchrun, on CPU: two processes (gloo) against one, a kill and a resume, FSDP.

Each run is the real entry point, ``torchrun --nproc-per-node 2 -m distill_pipeline.trainer.train
--spec FILE``, on the random two-layer Llama and the synthetic rows of ``test_trainer.py``. LoRA
dropout is off, so runs that see the same global batches compute the same arithmetic and differ
only in the order of floating-point sums (gradients all-reduced rather than accumulated):
adapters agree within ``ATOL``.
"""

# The fixtures tiny_llama and decoder_data come from test_trainer.py, imported by name so that
# pytest finds them; their parameters therefore shadow the imports (F811) by design.
# ruff: noqa: F811

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from distill_pipeline.trainer.distributed import World, passes, step_seed  # noqa: E402
from distill_pipeline.trainer.spec import TrainSpec  # noqa: E402
from distill_pipeline.trainer.train import train  # noqa: E402
from distill_pipeline_tests.test_trainer import (  # noqa: E402, F401  (fixtures used by name)
    decoder_data,
    decoder_spec,
    quiet,
    read_metrics,
    tiny_llama,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ATOL = 2e-5
RUN_TIMEOUT_S = 180
# 96 rows in micro-batches of 8 = 12 micro-batches; two per optimiser step = 6 steps.
SETTINGS = {
    "epochs": 1,
    "lora_dropout": 0.0,
    "eval_every_steps": 3,
    "checkpoint_every_steps": 2,
    "positive_label": 1,
}


def torchrun(spec_file: Path, *, nproc: int = 2, script: Path | None = None, env: dict | None = None):
    """The trainer as the pipeline launches it on N GPUs, here N CPU processes."""
    target = [str(script)] if script else ["-m", "distill_pipeline.trainer.train"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        # One node, its rendezvous on a free local port.
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *target,
        "--spec",
        str(spec_file),
    ]
    environment = (env or os.environ) | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


def write_spec(spec: TrainSpec, path: Path) -> Path:
    path.write_text(spec.to_json())
    return path


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol: float = ATOL) -> None:
    first, second = adapter_weights(a), adapter_weights(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def two_process_run(tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A two-process DDP run (one micro-batch per process per step), launched through Pipes."""
    dagster_pipes = pytest.importorskip("dagster_pipes")
    folder = tmp_path_factory.mktemp("ddp")
    spec = decoder_spec(tiny_llama, decoder_data, folder / "run", grad_accum_steps=1, **SETTINGS)
    messages = folder / "messages.jsonl"
    context = {
        "asset_keys": ["lora_adapter"],
        "code_version_by_asset_key": None,
        "provenance_by_asset_key": None,
        "partition_key": None,
        "partition_key_range": None,
        "partition_time_window": None,
        "run_id": "test-run",
        "job_name": None,
        "retry_number": 0,
        "extras": {},
    }
    env = os.environ | {
        "DAGSTER_PIPES_CONTEXT": dagster_pipes.encode_param({"data": context}),
        "DAGSTER_PIPES_MESSAGES": dagster_pipes.encode_param({"path": str(messages)}),
    }
    process = torchrun(write_spec(spec, folder / "spec.json"), env=env)
    assert process.returncode == 0, process.stderr[-4000:]
    return spec, folder, process, [json.loads(line) for line in messages.read_text().splitlines()]


def test_two_processes_train_the_adapter_one_process_trains_at_the_same_global_batch(
    two_process_run, tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    spec, _, process, messages = two_process_run
    run = Path(spec.output_dir)
    # One process accumulating two micro-batches sees the same 16-example global batches.
    alone = train(decoder_spec(tiny_llama, decoder_data, tmp_path / "alone", grad_accum_steps=2, **SETTINGS), log=quiet)
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["distributed"] == "ddp"
    assert result["global_batch_size"] == alone.global_batch_size == 16
    assert result["steps"] == alone.steps == 6
    assert_same_adapter(run, tmp_path / "alone")

    def curve(path: Path) -> list[tuple[int, str, float]]:
        return [(m["step"], key, m[key]) for m in read_metrics(path) for key in ("loss", "val_loss") if key in m]

    ours, theirs = curve(run), curve(tmp_path / "alone")
    # Rank 0 alone wrote the curve: every step once, no line twice.
    assert [(step, key) for step, key, _ in ours] == [(step, key) for step, key, _ in theirs]
    assert [step for step, key, _ in ours if key == "loss"] == [1, 2, 3, 4, 5, 6]
    assert [value for *_, value in ours] == pytest.approx([value for *_, value in theirs], rel=1e-4)
    # The validation rows were scored by both processes and gathered: the same loss, the same threshold.
    assert result["val_loss"] == pytest.approx(alone.val_loss, rel=1e-4)
    assert result["decision_threshold"] == pytest.approx(alone.decision_threshold)
    # Rank 0 alone talked to Dagster: one opening, one materialisation, one closing.
    methods = [m["method"] for m in messages]
    assert methods.count("opened") == 1 and methods.count("closed") == 1
    (materialization,) = [m["params"] for m in messages if m["method"] == "report_asset_materialization"]
    assert materialization["metadata"]["world_size"]["raw_value"] == 2.0
    assert materialization["metadata"]["global_batch_size"]["raw_value"] == 16.0
    # ...and nobody else wrote anything beside the run's own files.
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "data_hashes.json",
        "metrics.jsonl",
        "result.json",
        "spec.json",
    ]
    assert "global batch 16 examples = batch_size 8 x 1 accumulated x 2 process(es)" in process.stderr + "".join(
        m["params"].get("message", "") for m in messages if m["method"] == "log"
    )


def test_a_killed_two_process_run_resumes_with_two_processes_or_one_to_the_same_adapter(
    two_process_run, tmp_path: Path
) -> None:
    spec, _, _, _ = two_process_run
    killed = dataclasses.replace(spec, output_dir=str(tmp_path / "killed"))
    spec_file = write_spec(killed, tmp_path / "spec.json")
    # Rank 1 dies by SIGKILL right after the step-4 checkpoint; torchrun then stops rank 0.
    script = tmp_path / "die_after_step_4.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            from distill_pipeline.trainer.spec import TrainSpec
            from distill_pipeline.trainer.train import train

            def die(step):
                if step == 4 and os.environ["RANK"] == "1":
                    os.kill(os.getpid(), signal.SIGKILL)

            train(TrainSpec.from_file(sys.argv[-1]), after_checkpoint=die)
            """
        )
    )
    process = torchrun(spec_file, script=script)
    assert process.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in process.stderr
    out = Path(killed.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter").exists() and not (out / "result.json").exists()
    state = json.loads((out / "checkpoint-4" / "state.json").read_text())["trainer"]
    assert state["world_size"] == 2 and state["step"] == 4
    shutil.copytree(out, tmp_path / "killed-alone")

    # Resumed by two processes: the very adapter of the uninterrupted run.
    process = torchrun(spec_file)
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from_step"] == 4 and result["steps"] == 6
    assert_same_adapter(out, Path(spec.output_dir), atol=1e-6)
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4, 5, 6]

    # Resumed by one process: it keeps the checkpoint's global batch (two micro-batches a step).
    moved = dataclasses.replace(killed, output_dir=str(tmp_path / "killed-alone"))
    write_spec(moved, tmp_path / "killed-alone" / "spec.json")
    alone = train(moved, log=quiet)
    assert alone.resumed_from_step == 4 and alone.steps == 6 and alone.global_batch_size == 16
    assert_same_adapter(tmp_path / "killed-alone", Path(spec.output_dir))


def test_fsdp_shards_the_student_and_trains_the_ddp_adapter(two_process_run, tmp_path: Path) -> None:
    spec, _, _, _ = two_process_run
    sharded = dataclasses.replace(spec, distributed="fsdp", output_dir=str(tmp_path / "fsdp"))
    process = torchrun(write_spec(sharded, tmp_path / "spec.json"))
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads((tmp_path / "fsdp" / "result.json").read_text())
    assert result["distributed"] == "fsdp" and result["world_size"] == 2
    # Gathered from the shards, the adapter is whole and loads like any other.
    assert_same_adapter(tmp_path / "fsdp", Path(spec.output_dir))


# ---- the pieces


def test_the_world_comes_from_torchruns_environment() -> None:
    assert World.from_env({}) == World(1, 0, 0) and not World.from_env({}).distributed
    world = World.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (world.size, world.rank, world.local_rank, world.is_main) == (4, 3, 1, False)
    with pytest.raises(ValueError, match="RANK set without"):
        World.from_env({"RANK": "0"})
    with pytest.raises(ValueError, match="must be integers"):
        World.from_env({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="inconsistent"):
        World.from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_shares_are_disjoint_equal_in_count_and_cover_every_row() -> None:
    for n_rows, size in [(10, 3), (7, 2), (1, 4), (12, 4)]:
        shares = [World(size, rank, rank).share(n_rows) for rank in range(size)]
        assert len({len(s) for s in shares}) == 1
        assert sorted({i for s in shares for i in s}) == list(range(n_rows))
        assert all(
            len(set(s[: len(range(r, n_rows, size))])) == len(range(r, n_rows, size)) for r, s in enumerate(shares)
        )
    # An optimiser step's micro-batches: each once, the short last step padded with zero-loss passes.
    steps = [passes(range(5), World(2, rank, rank)) for rank in range(2)]
    assert steps == [[0, 2, 4], [1, 3, None]]
    assert step_seed(0, 0, 1) != step_seed(0, 1, 1) != step_seed(0, 0, 2)
