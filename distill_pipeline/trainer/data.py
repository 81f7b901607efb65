"""The trainer's data path: load tables, tokenise, bucket by length, pack, collate, hash.

Two codecs turn text into model inputs, one per student kind:

- ``EncoderCodec``: ``[CLS] text [SEP]``-style ids from the tokenizer; a batch is dynamically
  padded to its longest row, with an attention mask.
- ``DecoderCodec``: prompt ids (the template with the input in it) followed by the answer ids
  (" <label name>" and EOS). Only answer tokens are targets; prompt positions carry label -100.
  A batch's examples are packed, first-fit-decreasing, into rows of at most ``max_length`` tokens
  without padding between them ("padding-free packing"): position ids restart at 0 for every
  example and no attention mask is passed, and transformers then builds a block-diagonal causal
  mask from the position-id resets (``masking_utils.find_packed_sequence_indices``), so an
  example never attends to its row neighbours. Row tails are padded as a segment of their own.

Batches are formed by length bucketing: the shuffled examples are cut into mega-batches, each
sorted by length and sliced into batches, and the batch order is shuffled; every epoch's plan is
a pure function of (seed, epoch), so a resumed run replays exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
# Examples per mega-batch = this many batches: large enough that a batch is near-uniform in
# length, small enough that batches of all lengths occur throughout an epoch.
MEGA_BATCH_FACTOR = 50
MAX_LENGTH_QUANTILE = 0.95
MAX_LENGTH_MULTIPLE = 8


# The pipeline's file hash is core.store.file_sha256; the trainer keeps its own because it runs
# standalone, importing nothing of the pipeline.
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_rows(texts: Sequence[str], labels: Sequence[int]) -> str:
    """A hash of exactly the rows (and their order) a split contains."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(f"{len(text)}:{text}{label}\n".encode())
    return digest.hexdigest()


def load_table(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[int]]:
    """The text and integer label columns of a local Parquet or JSON Lines file."""
    table = _read_table(path, [text_column, label_column])
    texts = table[text_column]
    labels = table[label_column]
    bad = [i for i, (t, y) in enumerate(zip(texts, labels, strict=True)) if not isinstance(t, str) or y is None]
    if bad:
        raise ValueError(f"{path}: {len(bad)} row(s) without a text or label, first at row {bad[0]}")
    return list(texts), [int(y) for y in labels]


def load_soft_labels(path: str | Path, column: str) -> list[float | None]:
    """A column of P(positive) in [0, 1], None where a row has none (it then trains on its hard label)."""
    values = _read_table(path, [column])[column]
    bad = [
        i
        for i, p in enumerate(values)
        if p is not None and (isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0)
    ]
    if bad:
        raise ValueError(
            f"{path}: column {column!r} must hold probabilities in [0, 1] or nulls; "
            f"{len(bad)} row(s) do not, first at row {bad[0]} ({values[bad[0]]!r})"
        )
    return [None if p is None else float(p) for p in values]


def _read_table(path: str | Path, columns: list[str]):
    from datasets import load_dataset

    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        builder = "parquet"
    elif suffix in (".jsonl", ".json"):
        builder = "json"
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl file")
    table = load_dataset(builder, data_files=str(path), split="train")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; it has {table.column_names}")
    return table


def target_distributions(
    targets: Sequence[int],
    n_labels: int,
    *,
    soft: Sequence[float | None] | None = None,
    positive: int | None = None,
    soft_weight: float = 1.0,
    smoothing: float = 0.0,
) -> list[list[float]]:
    """Each row's training target as a distribution over the labels.

    The hard label one-hot; where a soft P(positive) is given, ``soft_weight`` of the mass moves
    to (1 - p, p) over the two labels (``positive`` indexes the positive one); then label
    smoothing keeps ``1 - smoothing`` of it and spreads ``smoothing`` evenly over every label.
    """
    if soft is not None and (positive is None or n_labels != 2):
        raise ValueError("soft labels are P(positive) of a two-label task: they need a positive label")
    rows = []
    for i, target in enumerate(targets):
        q = [0.0] * n_labels
        q[target] = 1.0
        p = soft[i] if soft is not None else None
        if p is not None:
            q = [(1.0 - soft_weight) * value for value in q]
            q[positive] += soft_weight * p
            q[1 - positive] += soft_weight * (1.0 - p)
        rows.append([(1.0 - smoothing) * value + smoothing / n_labels for value in q])
    return rows


def split_validation(n_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, validation) row indices, each in file order."""
    order = list(range(n_rows))
    random.Random(f"validation-split-{seed}").shuffle(order)
    n_validation = max(1, round(n_rows * fraction))
    if n_validation >= n_rows:
        raise ValueError(f"{n_rows} rows are too few to hold out a validation split")
    return sorted(order[n_validation:]), sorted(order[:n_validation])


@dataclass(frozen=True)
class LabelSet:
    values: list[int]
    names: list[str]

    def index_of(self, value: int) -> int:
        try:
            return self.values.index(value)
        except ValueError:
            raise ValueError(f"label {value} is not one of {self.values}") from None


def choose_max_length(lengths: Sequence[int], cap: int) -> int:
    """The 95th percentile of the lengths, rounded up to a multiple of 8, at most ``cap``."""
    if not lengths:
        raise ValueError("no lengths to choose a max_length from")
    ordered = sorted(lengths)
    quantile = ordered[max(0, math.ceil(MAX_LENGTH_QUANTILE * len(ordered)) - 1)]
    rounded = MAX_LENGTH_MULTIPLE * math.ceil(quantile / MAX_LENGTH_MULTIPLE)
    return min(rounded, cap)


@dataclass(frozen=True)
class Example:
    """One row, tokenised. ``ids``: the whole input (encoder) or the prompt (decoder)."""

    ids: list[int]
    target: int  # index into the LabelSet
    # The training target as a distribution over the labels (soft labels, label smoothing);
    # None: the one-hot of ``target``.
    distribution: tuple[float, ...] | None = None


class EncoderCodec:
    """Sequence-classification inputs: the tokenizer's own special tokens, truncated, padded."""

    kind = "encoder"
    min_length = 2

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def full_lengths(self, texts: Sequence[str], targets: Sequence[int]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]

    def encode(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]

    def length(self, example: Example) -> int:
        return len(example.ids)

    def target_count(self, example: Example) -> float:
        """What one example adds to the loss's denominator: one row."""
        return 1.0

    def collate(self, examples: Sequence[Example], max_length: int) -> dict[str, torch.Tensor]:
        """Padded rows; ``distributions`` [rows, labels] too when the examples carry soft targets."""
        width = max(len(e.ids) for e in examples)
        if width > max_length:
            raise ValueError(f"an example of {width} tokens exceeds max_length {max_length}")
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            input_ids[row, : len(example.ids)] = torch.tensor(example.ids)
            attention_mask[row, : len(example.ids)] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "targets": torch.tensor([e.target for e in examples]),
            "n_tokens": torch.tensor(int(attention_mask.sum())),
            "n_targets": torch.tensor(len(examples)),
        }
        if any(e.distribution is not None for e in examples):
            n_labels = len(next(e.distribution for e in examples if e.distribution is not None))
            batch["distributions"] = torch.tensor(
                [e.distribution or [float(label == e.target) for label in range(n_labels)] for e in examples]
            )
        return batch


class DecoderCodec:
    """Causal-LM inputs: ``[BOS] prefix+input | suffix | " answer" EOS``, loss on the answer only.

    The template's part before ``{input}`` is tokenised together with the input (so the input's
    first word is tokenised as it would be in running text), and only the input is truncated;
    the part after it and the answer are tokenised on their own, the same way at training and at
    prediction time.
    """

    kind = "decoder"

    def __init__(self, tokenizer, prompt_template: str, label_names: Sequence[str], packing: bool) -> None:
        self.tokenizer = tokenizer
        self.packing = packing
        self.prefix, self.suffix = prompt_template.split("{input}")
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
        self.bos_ids = [bos] if adds_bos else []
        self.suffix_ids = self._ids(self.suffix)
        eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.answers = [self._ids(" " + name) + eos_ids for name in label_names]
        if any(not a for a in self.answers):
            raise ValueError("every label name must tokenise to at least one token")
        self.max_answer_length = max(len(a) for a in self.answers)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.min_length = (
            len(self.bos_ids) + len(self._ids(self.prefix)) + 1 + len(self.suffix_ids) + self.max_answer_length
        )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _prefixed_inputs(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer([self.prefix + t for t in texts], add_special_tokens=False)["input_ids"]

    def full_lengths(self, texts: Sequence[str], targets: Sequence[int]) -> list[int]:
        fixed = len(self.bos_ids) + len(self.suffix_ids)
        return [
            fixed + len(ids) + len(self.answers[t])
            for ids, t in zip(self._prefixed_inputs(texts), targets, strict=True)
        ]

    def encode(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Prompt ids, the input truncated so that any answer still fits in max_length."""
        if max_length < self.min_length:
            raise ValueError(f"max_length {max_length} leaves no room for the input (need >= {self.min_length})")
        budget = max_length - len(self.bos_ids) - len(self.suffix_ids) - self.max_answer_length
        return [self.bos_ids + ids[:budget] + self.suffix_ids for ids in self._prefixed_inputs(texts)]

    def length(self, example: Example) -> int:
        return len(example.ids) + len(self.answers[example.target])

    def target_count(self, example: Example) -> float:
        """What one example adds to the loss's denominator: its answer tokens, expected under its
        target distribution (the hard label's answer length without one)."""
        if example.distribution is None:
            return float(len(self.answers[example.target]))
        return sum(q * len(answer) for q, answer in zip(example.distribution, self.answers, strict=True))

    def collate(self, examples: Sequence[Example], max_length: int) -> dict[str, torch.Tensor]:
        """Packed rows of prompt+answer sequences.

        ``labels[b, t]`` is the token at t when it is an answer token, else -100;
        ``predict_mask[b, t]`` marks the positions whose next token is a target, in the order of
        ``targets`` and ``target_example`` (the example, within this batch, a target belongs to).

        Examples with a target distribution are trained against every label's answer: one
        sequence per label of non-zero weight, and ``target_weights`` gives each answer token
        its label's weight, so the loss is the cross-entropy between the distribution and the
        answers' likelihoods (summed over tokens). It costs a forward per label.
        """
        if any(e.distribution is not None for e in examples):
            weighted = [
                (Example(e.ids, label), q)
                for e in examples
                for label, q in enumerate(
                    e.distribution or [float(lab == e.target) for lab in range(len(self.answers))]
                )
                if q > 0.0
            ]
            batch = self.collate([candidate for candidate, _ in weighted], max_length)
            weights = torch.tensor([q for _, q in weighted])
            batch["target_weights"] = weights[batch["target_example"]]
            batch["n_targets"] = torch.tensor(sum(self.target_count(e) for e in examples))
            batch["n_tokens"] = torch.tensor(sum(self.length(e) for e in examples))
            return batch
        sequences = [e.ids + self.answers[e.target] for e in examples]
        lengths = [len(s) for s in sequences]
        rows = pack_first_fit(lengths, max_length) if self.packing else [[i] for i in range(len(sequences))]
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        example_of = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                end = start + lengths[i]
                n_prompt = len(examples[i].ids)
                input_ids[r, start:end] = torch.tensor(sequences[i])
                position_ids[r, start:end] = torch.arange(lengths[i])
                labels[r, start + n_prompt : end] = input_ids[r, start + n_prompt : end]
                example_of[r, start + n_prompt : end] = i
                start = end
            # The padded tail is its own segment, so no real token attends to it.
            position_ids[r, start:] = torch.arange(width - start)
        predict_mask = torch.zeros_like(labels, dtype=torch.bool)
        predict_mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        target_positions = labels != IGNORE_INDEX
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
            "predict_mask": predict_mask,
            "targets": labels[target_positions],
            "target_example": example_of[target_positions],
            "n_tokens": torch.tensor(sum(lengths)),
            "n_targets": torch.tensor(int(target_positions.sum())),
        }


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of total length <= capacity, longest first (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of example indices: shuffled, sorted by length within mega-batches."""
    rng = random.Random(f"batches-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * MEGA_BATCH_FACTOR
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches for evaluation: by length, so padding is minimal; no shuffling."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
