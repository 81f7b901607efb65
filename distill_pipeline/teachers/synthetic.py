"""Synthetic inputs, Self-Instruct style: a teacher rewrites seed examples, then labels the rewrites.

For each seed and each of ``rewrites_per_seed`` variations (chosen per seed by a seeded
rotation through the task's list, so the set covers every variation evenly), the teacher is
asked for one rewrite with the task's rewrite prompt. A rewrite is dropped, with its reason,
when it is empty, the seed itself, a word-for-word duplicate of another kept example, or at
least ``max_similarity`` alike (word-set Jaccard) to its seed or to a rewrite of the same seed
already kept: such a row adds no variety, only weight. The survivors are labelled by the
teacher with the task's label prompt, parsed as usual. Both calls go through the ledger, so a
re-run pays nothing.

Each row keeps its seed's request id and the variation, so a synthetic example is never taken
for a logged one.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from distill_pipeline.core.normalise import jaccard, normalised_text, word_set
from distill_pipeline.core.task import PromptTemplate, SyntheticConfig, Task
from distill_pipeline.data.parsing import parse_responses
from distill_pipeline.teachers.client import TeacherClient, TeacherSpec

_WRAPPING_QUOTES = "'\"“”‘’` \n\t"


@dataclass(frozen=True)
class Seed:
    request_id: str
    input: str


@dataclass
class SyntheticResult:
    kept: list[dict] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)

    @property
    def removed_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.removed:
            counts[row["reason"]] = counts.get(row["reason"], 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))


def distinct_bigram_ratio(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all bigrams: a plain diversity measure (1.0 = no bigram repeats)."""
    seen: set[tuple[str, str]] = set()
    total = 0
    for text in texts:
        tokens = normalised_text(text).split()
        pairs = list(itertools.pairwise(tokens))
        seen.update(pairs)
        total += len(pairs)
    return len(seen) / total if total else 0.0


def rewrite_template(config: SyntheticConfig, variation: str) -> PromptTemplate:
    """The rewrite prompt for one variation (its own template: the ledger keys it apart)."""
    assert config.prompt is not None
    base = config.prompt
    return PromptTemplate(
        f"{base.id}:{variation}", base.version, base.text.replace("{variation}", variation), base.placeholder
    )


def clean_rewrite(text: str | None) -> str:
    return (text or "").strip().strip(_WRAPPING_QUOTES).strip()


def variations_for(seed: Seed, config: SyntheticConfig) -> list[str]:
    """``rewrites_per_seed`` variations for a seed, rotated by a hash of its id."""
    count = min(config.rewrites_per_seed, len(config.variations))
    start = int(hashlib.sha256(seed.request_id.encode()).hexdigest(), 16) % len(config.variations)
    return [config.variations[(start + i) % len(config.variations)] for i in range(count)]


def make_synthetic_examples(
    client: TeacherClient, rewriter: TeacherSpec, labeller: TeacherSpec, task: Task, seeds: Sequence[Seed]
) -> SyntheticResult:
    """Rewrite every seed, filter near duplicates, and label the rewrites that remain."""
    config = task.synthetic
    if config.prompt is None or not config.variations:
        raise ValueError(f"task {task.id!r} has no [synthetic] prompt and variations")
    plan: dict[str, list[Seed]] = {}
    for seed in seeds:
        for variation in variations_for(seed, config):
            plan.setdefault(variation, []).append(seed)
    candidates: list[tuple[Seed, str, str | None, str | None]] = []
    for variation, group in plan.items():
        answers = client.label(rewriter, rewrite_template(config, variation), [seed.input for seed in group])
        candidates += [(seed, variation, a.response, a.error) for seed, a in zip(group, answers, strict=True)]

    result = SyntheticResult()
    kept_texts: set[str] = set()
    kept_by_seed: dict[str, list[frozenset[str]]] = {}
    survivors: list[tuple[Seed, str, str]] = []
    for seed, variation, response, error in candidates:
        text = clean_rewrite(response)
        base = {"seed_request_id": seed.request_id, "variation": variation, "input": text}
        reason = None
        seed_words, text_words = word_set(seed.input), word_set(text)
        normalised = " ".join(sorted(text_words))
        if response is None:
            reason = f"teacher error: {error}"
        elif not text_words:
            reason = "empty rewrite"
        elif text_words == seed_words:
            reason = "same words as the seed"
        elif normalised in kept_texts:
            reason = "duplicate of another rewrite"
        elif jaccard(text_words, seed_words) >= config.max_similarity:
            reason = "too close to its seed"
        elif any(
            jaccard(text_words, other) >= config.max_similarity for other in kept_by_seed.get(seed.request_id, [])
        ):
            reason = "too close to another rewrite of its seed"
        if reason is not None:
            result.removed.append({**base, "reason": reason})
            continue
        kept_texts.add(normalised)
        kept_by_seed.setdefault(seed.request_id, []).append(text_words)
        survivors.append((seed, variation, text))

    label_template = task.prompt(labeller.prompt_id)
    answers = client.label(labeller, label_template, [text for _, _, text in survivors])
    parsed = parse_responses([a.response for a in answers], task.label)
    for (seed, variation, text), answer, label in zip(survivors, answers, parsed, strict=True):
        base = {"seed_request_id": seed.request_id, "variation": variation, "input": text}
        if label.label is None:
            reason = f"label: {answer.error}" if answer.response is None else f"label unparseable: {label.error}"
            result.removed.append({**base, "reason": reason})
            continue
        result.kept.append(
            {
                "request_id": "synthetic-"
                + hashlib.sha256(f"{seed.request_id}\n{variation}\n{text}".encode()).hexdigest()[:32],
                **base,
                "label": label.label,
                "parse_method": label.method,
                "model": labeller.model,
                "prompt_template_id": labeller.prompt_id,
                "rewritten_by": rewriter.model,
            }
        )
    return result
