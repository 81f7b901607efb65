"""Soft labels: the teacher's uncertainty as a probability per label, not only its answer.

Two sources, both computed from what the teachers already return:

- **log-probabilities** of the answer token, where the provider returns them (OpenAI's
  ``logprobs`` with ``top_logprobs``): at the position of the completion that carries the label
  the parse found, the probabilities of the alternative tokens that would have meant another label
  are summed per label and renormalised over the labels. The distribution is the teacher's,
  conditional on answering with a label at that point.
- **votes** of several teachers (or several samples of one): each label's share of the votes, or,
  where every voter gave a distribution, their mean.

A distribution is ``{label value: probability}``; in logs and tables its keys are the values as
text (JSON objects have string keys).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from distill_pipeline.core.task import LabelSpec

#: How many alternatives per token a teacher is asked for (OpenAI allows up to 20).
TOP_LOGPROBS = 5
#: Logged or computed distributions are rounded to this many decimals.
DIGITS = 6

Distribution = dict[int, float]


def token_label(token: str, label: LabelSpec) -> int | None:
    """The label a single answer token stands for (``"1"``, ``" true"``, ``"toxic"``), or None."""
    text = token.strip().strip("\"'`").lower()
    if not text:
        return None
    if text in label.aliases:
        return label.aliases[text]
    if text.lstrip("-").isdigit() and int(text) in label.values:
        return int(text)
    return None


def distribution_from_logprobs(
    positions: Sequence[Mapping[str, Any]], chosen_label: int | None, label: LabelSpec
) -> Distribution | None:
    """P(label) at the last completion token that says ``chosen_label`` (the label the answer was
    parsed to), from that position's top alternatives; None when no position says it.

    ``positions`` are OpenAI's ``choices[0].logprobs.content`` entries: ``token``, ``logprob`` and
    ``top_logprobs`` (a list of ``token`` / ``logprob``).
    """
    if chosen_label is None:
        return None
    for position in reversed(positions):
        if token_label(str(position.get("token", "")), label) != chosen_label:
            continue
        mass: dict[int, float] = {}
        alternatives = list(position.get("top_logprobs") or [])
        if not any(alt.get("token") == position.get("token") for alt in alternatives):
            alternatives.append({"token": position.get("token"), "logprob": position.get("logprob")})
        for alternative in alternatives:
            value = token_label(str(alternative.get("token", "")), label)
            logprob = alternative.get("logprob")
            if value is None or not isinstance(logprob, int | float) or not math.isfinite(logprob):
                continue
            mass[value] = mass.get(value, 0.0) + math.exp(logprob)
        total = sum(mass.values())
        if total <= 0.0:
            return None
        return {value: round(mass.get(value, 0.0) / total, DIGITS) for value in label.values}
    return None


def vote_distribution(
    labels: Sequence[int | None], values: Sequence[int], distributions: Sequence[Distribution | None] | None = None
) -> Distribution | None:
    """The teachers' combined distribution: the mean of their distributions where every teacher
    that answered gave one, else each label's share of the votes; None when nobody answered."""
    answered = [i for i, value in enumerate(labels) if value is not None]
    if not answered:
        return None
    given = [distributions[i] for i in answered] if distributions is not None else []
    if given and all(d is not None for d in given):
        return {v: round(sum(d.get(v, 0.0) for d in given) / len(given), DIGITS) for v in values}  # type: ignore[union-attr]
    return {v: round(sum(labels[i] == v for i in answered) / len(answered), DIGITS) for v in values}


def to_json_keys(distribution: Distribution | None) -> dict[str, float] | None:
    """A distribution as a JSON object (string keys), the way logs and tables hold it."""
    return None if distribution is None else {str(k): float(v) for k, v in distribution.items()}


def from_json_keys(raw: Mapping[str, Any] | None, label: LabelSpec) -> Distribution | None:
    """A logged distribution back as ``{label value: probability}``; None when it is not a valid one.

    Valid: every key a label value, every probability finite in [0, 1], summing to 1 within 1e-3
    (a logged distribution is the client's word, so it is checked, not trusted).
    """
    if not isinstance(raw, Mapping) or not raw:
        return None
    parsed: Distribution = {}
    for key, probability in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            return None
        if value not in label.values or isinstance(probability, bool) or not isinstance(probability, int | float):
            return None
        if not math.isfinite(probability) or not 0.0 <= probability <= 1.0:
            return None
        parsed[value] = float(probability)
    if abs(sum(parsed.values()) - 1.0) > 1e-3:
        return None
    return {value: parsed.get(value, 0.0) for value in label.values}
