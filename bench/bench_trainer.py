"""Trainer benchmark: LoRA training throughput of distill_pipeline.trainer against a plain HF Trainer.

Three runs train the same LoRA student (same base, rank, targets, batch size, learning rate,
max_length and rows) for one epoch of synthetic comments with a long-tailed length distribution
(or real texts from ``--corpus``):

- ``ours``: ``distill_pipeline.trainer.train`` (length-bucketed batches, packing for decoders,
  bf16 autocast + SDPA on CUDA, logits only at target positions);
- ``hf-maxlen``: the plain ``transformers.Trainer`` recipe, the baseline: every example padded
  to max_length (``padding="max_length"``), default settings (random batches);
- ``hf-random``: ``transformers.Trainer`` with dynamic padding (to the longest in each batch);
- ``hf-grouped``: the same with ``train_sampling_strategy="group_by_length"``;
- ``hf-grouped-flat`` (decoders): grouped, and padding-free with ``DataCollatorWithFlattening``:
  the strongest stock configuration for a decoder.

Throughput counts real (non-pad) tokens per second of training-loop time. MFU counts 4N FLOPs
per token (forward 2N, backward through activations 2N; the frozen base needs no weight
gradients), N = the base's parameters less its input embeddings, against --peak-tflops (only
meaningful on a GPU; absolute times are only meaningful on the GPU machine, ratios anywhere).

    python bench/bench_trainer.py                                   # MiniLM encoder, CPU-sized
    python bench/bench_trainer.py --rows 4096 --batch-size 64       # bigger
    python bench/bench_trainer.py --corpus "${DISTILL_SHARED_DATA:-../shared/data}/jigsaw/train.parquet"  # real lengths
    python bench/bench_trainer.py --random-llama 1b --rows 8192 --batch-size 16 --peak-tflops 790
    python bench/bench_trainer.py --student-kind decoder --base-model /path/to/llama
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from distill_pipeline.trainer.data import Example, LabelSet, choose_max_length
from distill_pipeline.trainer.model import load_tokenizer, resolve_base_model
from distill_pipeline.trainer.predict import make_codec
from distill_pipeline.trainer.spec import TrainSpec
from distill_pipeline.trainer.train import train

WORDS = [
    "the",
    "a",
    "an",
    "this",
    "that",
    "your",
    "my",
    "our",
    "their",
    "comment",
    "post",
    "article",
    "edit",
    "page",
    "user",
    "people",
    "time",
    "way",
    "day",
    "thing",
    "world",
    "life",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "point",
    "number",
    "group",
    "problem",
    "fact",
    "good",
    "new",
    "first",
    "last",
    "long",
    "great",
    "little",
    "own",
    "other",
    "old",
    "right",
    "big",
    "high",
    "different",
    "small",
    "large",
    "next",
    "early",
    "young",
    "important",
    "few",
    "public",
    "bad",
    "same",
    "able",
    "idiot",
    "stupid",
    "hate",
    "awful",
    "lovely",
    "kind",
    "thanks",
    "helpful",
    "friendly",
    "wonderful",
    "is",
    "was",
    "are",
    "be",
    "have",
    "do",
    "say",
    "get",
    "make",
    "go",
    "know",
    "take",
    "see",
    "come",
    "think",
    "look",
    "want",
    "give",
    "use",
    "find",
    "tell",
    "ask",
    "work",
    "seem",
    "feel",
    "try",
    "leave",
    "call",
    "and",
    "or",
    "but",
    "if",
    "because",
    "when",
    "while",
    "about",
    "with",
    "from",
    "into",
    "over",
    "after",
]
LABEL_NAMES = ["ok", "toxic"]
RANDOM_LLAMAS = {
    # Llama-3.2-1B and Llama-3.1-8B shapes; random weights are as good as real ones for throughput.
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32},
}


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Comments of log-normal length (median about 20 words, a long tail), label from marker words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = min(400, max(3, int(rng.lognormvariate(3.0, 0.8))))
        words = [rng.choice(WORDS) for _ in range(length)]
        rows.append(
            {"input": " ".join(words), "label": int(any(w in ("idiot", "stupid", "hate", "awful") for w in words))}
        )
    return rows


def corpus_rows(path: Path, n: int, seed: int, text_column: str, label_column: str) -> list[dict]:
    """A seeded sample of real texts (e.g. Jigsaw comments), for a real length distribution."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[text_column, label_column]).to_pylist()
    rows = [{"input": r[text_column], "label": int(r[label_column])} for r in table if r[text_column]]
    if len(rows) < n:
        raise SystemExit(f"{path} has {len(rows):,} texts, fewer than --rows {n:,}")
    return random.Random(seed).sample(rows, n)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_random_llama(size: str, folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {
        token: i
        for i, token in enumerate(
            dict.fromkeys(
                ["<pad>", "<s>", "</s>", "<unk>", *WORDS, *LABEL_NAMES, "Classify", "text", ".", "Text", ":", "Answer"]
            )
        )
    }
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)
    shape = RANDOM_LLAMAS[size]
    config = LlamaConfig(
        vocab_size=len(vocab) if size == "tiny" else 128256,  # the real vocabulary's lm_head cost
        num_key_value_heads=max(1, shape["num_attention_heads"] // 4),
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=size == "1b",
        dtype="bfloat16",
        **shape,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(folder)
    return folder


def flops_per_token(base_model: str, kind: str) -> float:
    """4N, N = parameters less the input embeddings (counted on the meta device, no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        auto = AutoModelForSequenceClassification if kind == "encoder" else AutoModelForCausalLM
        model = auto.from_config(config)
    embeddings = model.get_input_embeddings().weight.numel()
    return 4.0 * (sum(p.numel() for p in model.parameters()) - embeddings)


def hf_trainer_run(
    spec: TrainSpec,
    base_model: str,
    examples: list[Example],
    codec,
    strategy: str,
    out: Path,
    pad_to: int | None = None,
    flatten: bool = False,
) -> tuple[float, int]:
    """(train seconds, real tokens) for one epoch of transformers.Trainer on the same ids; every
    row padded to ``pad_to`` tokens when given, else to the longest row of its batch; a decoder's
    batch concatenated into one row without padding when ``flatten`` (``DataCollatorWithFlattening``,
    position ids restarting per example: the stock padding-free recipe)."""
    from datasets import Dataset
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from distill_pipeline.trainer.model import add_lora, choose_runtime, load_base_model, lora_config

    runtime = choose_runtime(spec.device, lambda _m: None)
    labels = LabelSet(spec.label_values, spec.label_names)
    model = add_lora(
        load_base_model(spec.student_kind, base_model, labels, runtime),
        lora_config(spec.student_kind, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.target_modules),
    )
    if spec.student_kind == "encoder":
        rows = {"input_ids": [e.ids for e in examples], "labels": [e.target for e in examples]}
        collator = DataCollatorWithPadding(codec.tokenizer, padding="max_length" if pad_to else True, max_length=pad_to)
    else:
        sequences = [e.ids + codec.answers[e.target] for e in examples]
        masked = [[-100] * len(e.ids) + codec.answers[e.target] for e in examples]
        rows = {"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences], "labels": masked}
        codec.tokenizer.pad_token_id = codec.pad_id
        longest_answer = max(len(answer) for answer in codec.answers)
        if flatten:
            rows.pop("attention_mask")
            # Its labels: the ids of each example, the first of each masked; the answer-only labels go in as they are.
            collator = DataCollatorWithFlattening(return_position_ids=True)
        else:
            collator = DataCollatorForSeq2Seq(
                codec.tokenizer,
                label_pad_token_id=-100,
                padding="max_length" if pad_to else True,
                max_length=pad_to + longest_answer if pad_to else None,
            )
    tokens = sum(len(ids) for ids in rows["input_ids"])
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=spec.batch_size,
        num_train_epochs=spec.epochs,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_schedule,
        warmup_steps=spec.warmup_ratio,
        train_sampling_strategy=strategy,
        bf16=runtime.device.type == "cuda",
        use_cpu=runtime.device.type == "cpu",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), data_collator=collator)
    metrics = trainer.train().metrics
    return float(metrics["train_runtime"]), tokens * spec.epochs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-kind", choices=["encoder", "decoder"], default="encoder")
    parser.add_argument("--base-model", default=None, help="default: the packaged MiniLM (encoder)")
    parser.add_argument("--random-llama", choices=sorted(RANDOM_LLAMAS), help="a random-weight Llama decoder")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (markdown)")
    parser.add_argument("--corpus", type=Path, default=None, help="a Parquet table of real texts instead of synthetic")
    parser.add_argument("--text-column", default="comment_text")
    parser.add_argument("--label-column", default="is_bad")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        kind, base = args.student_kind, args.base_model
        if args.random_llama:
            kind, base = "decoder", str(make_random_llama(args.random_llama, scratch / "llama"))
        if args.corpus:
            drawn = corpus_rows(args.corpus, args.rows + 32, 1, args.text_column, args.label_column)
            rows, validation = drawn[: args.rows], drawn[args.rows :]
        else:
            rows, validation = synthetic_rows(args.rows, 1), synthetic_rows(32, 2)
        spec = TrainSpec(
            train_path=str(write_jsonl(rows, scratch / "train.jsonl")),
            validation_path=str(write_jsonl(validation, scratch / "validation.jsonl")),
            student_kind=kind,
            base_model=base,
            label_values=[0, 1],
            label_names=LABEL_NAMES,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            epochs=1,
            batch_size=args.batch_size,
            eval_every_steps=None,
            checkpoint_every_steps=None,
        )
        base_model = resolve_base_model(base)
        tokenizer = load_tokenizer(base_model)
        codec = make_codec(kind, tokenizer, LabelSet([0, 1], LABEL_NAMES), spec.prompt_template, spec.packing)
        targets = [r["label"] for r in rows]
        max_length = choose_max_length(codec.full_lengths([r["input"] for r in rows], targets), spec.max_length_cap)
        spec.max_length = max_length
        examples = [
            Example(ids, t)
            for ids, t in zip(codec.encode([r["input"] for r in rows], max_length), targets, strict=True)
        ]

        results = {}
        spec.output_dir = str(scratch / "ours")
        ours = train(spec, log=lambda _m: None)
        results["ours"] = (ours.train_tokens / ours.train_tokens_per_s, ours.train_tokens)
        results["hf-maxlen"] = hf_trainer_run(
            spec, base_model, examples, codec, "random", scratch / "hf-maxlen", pad_to=max_length
        )
        for strategy, name in (("random", "hf-random"), ("group_by_length", "hf-grouped")):
            results[name] = hf_trainer_run(spec, base_model, examples, codec, strategy, scratch / name)
        if kind == "decoder":
            results["hf-grouped-flat"] = hf_trainer_run(
                spec, base_model, examples, codec, "group_by_length", scratch / "hf-flat", flatten=True
            )
        flops = flops_per_token(base_model, kind)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    import peft
    import transformers

    lines = [
        f"# Trainer throughput: {kind} {args.random_llama or base or 'all-MiniLM-L6-v2 (packaged)'}",
        "",
        f"{device}; {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}; {args.rows} rows of {args.corpus.name if args.corpus else 'synthetic text'}, 1 epoch, batch {args.batch_size}, max_length {max_length}, "
        f"LoRA r={args.lora_r}; 4N = {flops / 1e9:.3f} GFLOP/token",
        "",
        "| run | seconds | real tokens | real tokens/s | samples/s | vs hf-maxlen | vs hf-random | TFLOP/s | MFU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    baseline = results["hf-maxlen"][1] / results["hf-maxlen"][0]
    dynamic = results["hf-random"][1] / results["hf-random"][0]
    for name, (seconds, tokens) in results.items():
        rate = tokens / seconds
        tflops = rate * flops / 1e12
        mfu = f"{tflops / args.peak_tflops:.1%}" if args.peak_tflops else "n/a"
        lines.append(
            f"| {name} | {seconds:.2f} | {tokens:,} | {rate:,.0f} | {args.rows / seconds:,.1f} | "
            f"{rate / baseline:.2f}x | {rate / dynamic:.2f}x | {tflops:.4f} | {mfu} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    return 0 if all(math.isfinite(s) for s, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
