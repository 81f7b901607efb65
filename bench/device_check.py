"""Device check: the trainer on a GPU machine, in one command, printing one table.

    python bench/device_check.py                 # on an H100/H200: under 8 minutes, nothing downloaded
    python bench/device_check.py --smoke         # anywhere (CPU too): tiny configs, a couple of steps

1. ``pytest -m gpu distill_pipeline_tests/test_cuda.py``: bf16 loading on the device, the fp16
   gradient-scaler path, gradient checkpointing with LoRA, two-GPU DDP and FSDP (with two GPUs).
2. Throughput of the trainer on random-initialised Llama-3.2-1B and Llama-3.1-8B shapes with
   LoRA (bf16, all linear layers, r=16) against the strongest stock baseline, measured in the same
   run on the same rows: ``transformers.Trainer`` with bf16, SDPA, ``group_by_length`` and the
   padding-free ``DataCollatorWithFlattening``. Real (non-pad) tokens/s, MFU at 4N FLOPs per
   token (N = parameters less the input embeddings; the frozen base needs no weight gradients)
   against the card's dense bf16 peak, and the peak GPU memory of each.
3. One LoRA step of the 8B shape on a 2,048-token row: its peak memory against 80 GB.
4. An encoder (the packaged MiniLM) and a decoder (a random tiny Llama) student trained and
   evaluated through the Dagster step (``dg.materialize`` of ``lora_adapter`` and ``eval_report``
   on simulated traffic), on the GPU.
5. With two GPUs: the 1B run under ``torchrun --nproc-per-node 2`` (DDP), tokens/s against one GPU.

Random weights are as good as real ones for throughput and memory (ENGINEERING.md section 6).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_trainer import (  # noqa: E402
    LABEL_NAMES,
    WORDS,
    flops_per_token,
    hf_trainer_run,
    make_random_llama,
    synthetic_rows,
    write_jsonl,
)

from distill_pipeline.trainer.data import Example, LabelSet, choose_max_length  # noqa: E402
from distill_pipeline.trainer.model import load_tokenizer  # noqa: E402
from distill_pipeline.trainer.predict import make_codec  # noqa: E402
from distill_pipeline.trainer.spec import TrainSpec  # noqa: E402
from distill_pipeline.trainer.train import train  # noqa: E402

# Dense bf16 peaks (TFLOP/s, without sparsity) of the cards this check is meant for.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
GIB = 1 << 30
FIT_LIMIT_BYTES = 80e9


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, check: str, sizes: str, result: str, verdict: str) -> None:
        self.rows.append((check, sizes, result, verdict))
        print(f"  {check}: {result} [{verdict}]", flush=True)

    def markdown(self) -> str:
        lines = ["| check | sizes | result | verdict |", "| --- | --- | --- | --- |"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for card, peak in PEAK_BF16_TFLOPS.items() if card in name), None)


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else float("nan")


def run_gpu_tests(table: Table) -> None:
    started = time.perf_counter()
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "distill_pipeline_tests/test_cuda.py",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    summary = next(
        (
            line.strip("= ")
            for line in reversed(process.stdout.splitlines())
            if re.search(r"\d+ (passed|failed|skipped)", line)
        ),
        process.stdout[-300:],
    )
    verdict = "ok" if process.returncode == 0 else "FAILED"
    if process.returncode != 0:
        print(process.stdout[-6000:], process.stderr[-2000:], sep="\n")
    table.add(
        "pytest -m gpu (test_cuda.py)", "tiny Llama", f"{summary} in {time.perf_counter() - started:.0f} s", verdict
    )


def spec_for(base: str, rows: list[dict], scratch: Path, name: str, **settings) -> TrainSpec:
    values = {
        "train_path": str(write_jsonl(rows, scratch / f"{name}-train.jsonl")),
        "validation_path": str(write_jsonl(synthetic_rows(32, 2), scratch / f"{name}-validation.jsonl")),
        "student_kind": "decoder",
        "base_model": base,
        "label_values": [0, 1],
        "label_names": LABEL_NAMES,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "epochs": 1,
        "eval_every_steps": None,
        "checkpoint_every_steps": None,
        "calibrate_threshold": False,
        "output_dir": str(scratch / name),
    }
    return TrainSpec(**(values | settings))


def throughput(table: Table, size: str, rows: int, batch_size: int, scratch: Path) -> None:
    """The trainer against the strongest stock HF Trainer, on the same rows of the same model."""
    base = str(make_random_llama(size, scratch / f"llama-{size}"))
    data = synthetic_rows(rows, 1)
    spec = spec_for(base, data, scratch, f"ours-{size}", batch_size=batch_size)
    tokenizer = load_tokenizer(base)
    codec = make_codec("decoder", tokenizer, LabelSet([0, 1], LABEL_NAMES), spec.prompt_template, spec.packing)
    targets = [r["label"] for r in data]
    spec.max_length = choose_max_length(codec.full_lengths([r["input"] for r in data], targets), spec.max_length_cap)
    examples = [
        Example(ids, t)
        for ids, t in zip(codec.encode([r["input"] for r in data], spec.max_length), targets, strict=True)
    ]
    flops = flops_per_token(base, "decoder")
    peak = peak_tflops()

    reset_memory()
    ours = train(spec, log=lambda _m: None)
    ours_memory = peak_memory_gib()
    ours_rate = ours.train_tokens_per_s
    reset_memory()
    seconds, tokens = hf_trainer_run(
        spec, base, examples, codec, "group_by_length", scratch / f"hf-{size}", flatten=True
    )
    hf_memory = peak_memory_gib()
    hf_rate = tokens / seconds
    reset_memory()

    def mfu(rate: float) -> str:
        return f"{rate * flops / 1e12 / peak:.1%}" if peak else "n/a"

    sizes = (
        f"{flops / 4e9:.2f}B params (less embeddings), {rows} rows, batch {batch_size}, max_length {spec.max_length}"
    )
    table.add(
        f"LoRA throughput, {size} Llama: ours",
        sizes,
        f"{ours_rate:,.0f} real tokens/s, MFU {mfu(ours_rate)}, peak {ours_memory:.1f} GiB",
        f"{ours_rate / hf_rate:.2f}x HF",
    )
    table.add(
        f"LoRA throughput, {size} Llama: HF Trainer (bf16, SDPA, group_by_length, flattening)",
        sizes,
        f"{hf_rate:,.0f} real tokens/s, MFU {mfu(hf_rate)}, peak {hf_memory:.1f} GiB",
        "baseline",
    )
    return base


def long_step_fits(table: Table, base: str, size: str, tokens: int, scratch: Path) -> None:
    """One optimiser step on a row of ``tokens`` tokens; its peak memory against 80 GB."""
    words = " ".join(WORDS[i % len(WORDS)] for i in range(tokens))
    data = [{"input": words, "label": i % 2} for i in range(2)]
    spec = spec_for(
        base, data, scratch, f"long-{size}", batch_size=1, grad_accum_steps=2, max_length=tokens, max_length_cap=tokens
    )
    reset_memory()
    result = train(spec, log=lambda _m: None)
    used = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    shown = f"{used / GIB:.1f} GiB peak" if used is not None else "no GPU: not measured"
    verdict = "n/a" if used is None else ("fits in 80 GB" if used < FIT_LIMIT_BYTES else "DOES NOT FIT")
    table.add(f"one LoRA step, {size} Llama", f"{result.max_length} tokens x 1 row", shown, verdict)
    reset_memory()


def dagster_students(table: Table, tiny_llama: str, scratch: Path) -> None:
    """An encoder and a decoder student, trained and evaluated through the Dagster step."""
    import dagster as dg

    from distill_pipeline.core.store import LocalStore
    from distill_pipeline.core.task import BUILTIN_TASKS_DIR, load_task
    from distill_pipeline.demo.simulator import simulate_traffic
    from distill_pipeline_tests.test_students import ALL_ASSETS, student_resources

    for kind in ("encoder", "decoder"):
        folder = scratch / f"task-{kind}"
        shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
        text = (folder / "task.toml").read_text()
        replacements = [
            ("in_distribution_test_size = 500", "in_distribution_test_size = 60"),
            ("balanced_test_size = 200", "balanced_test_size = 30"),
            ('train_sizes = ["5%", "10%", "25%", "50%", "75%", "100%"]', 'train_sizes = ["50%"]'),
            ("max_length_cap = 128", "max_length_cap = 64"),
            ("min_train_steps = 60", "min_train_steps = 20"),
        ]
        if kind == "decoder":
            replacements += [
                ('student_kind = "encoder"', f'student_kind = "decoder"\nbase_model = "{tiny_llama}"'),
                ('target_modules = ["query", "key", "value", "dense"]', ""),
            ]
        for old, new in replacements:
            if old not in text:
                raise SystemExit(f"the toxicity task no longer has {old!r}: update bench/device_check.py")
            text = text.replace(old, new)
        (folder / "task.toml").write_text(text)
        task = load_task(folder)
        store = LocalStore(scratch / f"store-{kind}")
        simulate_traffic(store, days=["2026-03-01"], records_per_day=700, seed=4, task=task)
        resources = student_resources(store, task, scratch / f"work-{kind}")
        started = time.perf_counter()
        with dg.instance_for_test() as instance:

            def materialize(
                asset: str, partition: str | None = None, resources: dict = resources
            ) -> dg.ExecuteInProcessResult:
                return dg.materialize(
                    ALL_ASSETS, selection=[asset], partition_key=partition, resources=resources, instance=instance
                )

            for asset, partition in [
                ("raw_logs", "2026-03-01"),
                ("teacher_labels", "2026-03-01"),
                ("curated_examples", None),
                ("test_sets", None),
                ("train_sets", "50pct"),
            ]:
                if not materialize(asset, partition).success:
                    raise SystemExit(f"{asset} failed")
            adapter = materialize("lora_adapter", "50pct|base")
            report = materialize("eval_report", "50pct|base")
        if not (adapter.success and report.success):
            table.add(f"Dagster {kind} student", "50% of 700 simulated rows", "the step failed", "FAILED")
            continue
        (trained,) = adapter.asset_materializations_for_node("lora_adapter")
        (evaluated,) = report.asset_materializations_for_node("eval_report")
        trained_meta = {k: getattr(v, "value", v) for k, v in trained.metadata.items()}
        eval_meta = {k: getattr(v, "value", v) for k, v in evaluated.metadata.items()}
        table.add(
            f"Dagster {kind} student (lora_adapter + eval_report)",
            f"50% of 700 simulated rows, {trained_meta.get('steps', 0):.0f} steps",
            f"on {trained_meta.get('device')}; accuracy in-distribution "
            f"{eval_meta.get('student_accuracy_in_distribution', float('nan')):.3f}, balanced "
            f"{eval_meta.get('student_accuracy_balanced', float('nan')):.3f}; {time.perf_counter() - started:.0f} s",
            "ok",
        )


def two_gpus(table: Table, base: str, rows: int, batch_size: int, scratch: Path) -> None:
    """The 1B run on two GPUs (DDP) against one, at the same per-GPU batch."""
    data = synthetic_rows(rows, 1)
    rates = {}
    for nproc in (1, 2):
        spec = spec_for(base, data, scratch, f"ddp-{nproc}", batch_size=batch_size)
        spec_file = scratch / f"ddp-{nproc}.json"
        spec_file.write_text(spec.to_json())
        process = subprocess.run(
            [
                *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)),
                *("-m", "distill_pipeline.trainer.train", "--spec", str(spec_file)),
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        if process.returncode != 0:
            print(process.stderr[-4000:])
            table.add("DDP, 1B Llama", f"{nproc} GPU(s)", "torchrun failed", "FAILED")
            return
        rates[nproc] = json.loads((Path(spec.output_dir) / "result.json").read_text())["train_tokens_per_s"]
    table.add(
        "DDP, 1B Llama: 2 GPUs vs 1",
        f"{rows} rows, batch {batch_size} per GPU",
        f"{rates[2]:,.0f} vs {rates[1]:,.0f} real tokens/s",
        f"{rates[2] / rates[1]:.2f}x",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs, a couple of steps: runs anywhere")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (markdown)")
    parser.add_argument("--skip-dagster", action="store_true", help="leave out the Dagster students")
    args = parser.parse_args()

    import peft
    import transformers

    table = Table()
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    card = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}" if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device check on {card}", flush=True)
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA GPU here: run with --smoke, or on a GPU machine")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        run_gpu_tests(table)
        if args.smoke:
            tiny = throughput(table, "tiny", rows=64, batch_size=16, scratch=scratch)
            long_step_fits(table, tiny, "tiny", tokens=120, scratch=scratch)
        else:
            one_b = throughput(table, "1b", rows=2048, batch_size=16, scratch=scratch)
            eight_b = throughput(table, "8b", rows=1024, batch_size=8, scratch=scratch)
            long_step_fits(table, eight_b, "8b", tokens=2048, scratch=scratch)
            shutil.rmtree(Path(eight_b), ignore_errors=True)
        if not args.skip_dagster:
            tiny_llama = str(make_random_llama("tiny", scratch / "llama-tiny-dagster"))
            dagster_students(table, tiny_llama, scratch)
        if cuda and torch.cuda.device_count() >= 2 and not args.smoke:
            two_gpus(table, one_b, rows=2048, batch_size=16, scratch=scratch)
        elif not args.smoke:
            table.add("DDP, 1B Llama: 2 GPUs vs 1", "-", "one GPU here", "n/a")

    header = (
        f"# Device check{' (smoke)' if args.smoke else ''}\n\n{card}; Python {platform.python_version()}, "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
        f"peft {peft.__version__}; bf16 peak {peak_tflops() or 'n/a'} TFLOP/s; "
        f"{time.perf_counter() - started:.0f} s in all\n"
    )
    text = header + "\n" + table.markdown()
    print("\n" + text)
    if args.output:
        args.output.write_text(text + "\n")
    return 1 if any(row[3] in ("FAILED", "DOES NOT FIT") for row in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
