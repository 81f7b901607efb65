"""Simulated teacher traffic: realistic log objects for a machine with no data and no network.

Each simulated call has a user comment (from built-in templates and word lists over several
topics, or sampled from a corpus table), a hidden true label, and a teacher answer that is right
about 94% of the time, written in the formats real teachers produce. The traffic has the skew of
real traffic (a few power users send much of it; copy-paste spam; exact and near duplicates;
a long tail of long comments) and the faults of real log objects (truncated lines, lines that are
not JSON, records missing a field or with a wrongly typed one, a record written twice, invalid
UTF-8), each counted in the summary so ingestion's accounting can be checked against it.

With a rollout mode (``TrafficProfile.rollout``) the traffic is served the way ``distill-pipeline
serve`` logs it: a student stand-in answers beside the teacher or instead of it, agreeing with the
teacher at a configurable rate (its confidence calibrated to that rate), each call says who served
it and the part each model played (``call_kind``), and end users' late verdicts (thumbs down and
regenerate, likelier on a wrong answer) are appended to the feedback stream. Without one, the
output is the teacher-only traffic above, byte for byte.

Everything is drawn from numpy generators seeded by ``(seed, day)``, so a day's objects are the
same bytes whichever other days are simulated with it. Strings are built column-wise with Arrow
compute kernels and JSON-encoded by DuckDB; Python touches single records only for the few
malformed lines.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill_pipeline.core.layout import GOLD_LABELS
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.task import PromptTemplate, Task
from distill_pipeline.data.gold import GOLD_LABEL, GOLD_TEXT
from distill_pipeline.logs.importer import log_line_sql, object_payloads, publish_day_objects, read_source_table
from distill_pipeline.logs.schema import (
    ROLLOUT_MODES,
    SCHEMA_FIELDS,
    SCHEMA_VERSION,
    FeedbackEvent,
    encode_log_object,
    feedback_object_key,
)

# --- what the comments are made of -------------------------------------------------------------
# The word lists and templates are data, in words/ beside this module: comments.json holds what
# the users write (in English, and in Spanish for the drift injection), answers.json the reasons
# and explanations the teacher gives.


def _load_words(name: str) -> dict[str, Any]:
    """A words/ file with its lists as tuples (and a dict of lists as a dict of tuples)."""
    words = resources.files("distill_pipeline.demo").joinpath("words").joinpath(name)
    raw = json.loads(words.read_text(encoding="utf-8"))
    return {
        key: {inner: tuple(items) for inner, items in value.items()} if isinstance(value, dict) else tuple(value)
        for key, value in raw.items()
    }


_COMMENT_WORDS = _load_words("comments.json")
_ANSWER_WORDS = _load_words("answers.json")

TOPIC_NOUNS: dict[str, tuple[str, ...]] = _COMMENT_WORDS["TOPIC_NOUNS"]
SLOT_WORDS: dict[str, tuple[str, ...]] = {
    **_COMMENT_WORDS["SLOT_WORDS"],
    "num": tuple(str(i) for i in range(1, 301)),
}
BENIGN_TEMPLATES: tuple[str, ...] = _COMMENT_WORDS["BENIGN_TEMPLATES"]
FILLER_TEMPLATES: tuple[str, ...] = (*BENIGN_TEMPLATES, *_COMMENT_WORDS["FILLER_EXTRA_TEMPLATES"])
TOXIC_TEMPLATES: tuple[str, ...] = _COMMENT_WORDS["TOXIC_TEMPLATES"]
# Benign, but with the vocabulary of insults aimed at things or at oneself: the hard cases.
BORDERLINE_TEMPLATES: tuple[str, ...] = _COMMENT_WORDS["BORDERLINE_TEMPLATES"]
TINY_TEXTS: tuple[str, ...] = _COMMENT_WORDS["TINY_TEXTS"]
SPAM_TEXTS: tuple[str, ...] = _COMMENT_WORDS["SPAM_TEXTS"]
# Openings and sign-offs around whole comments (half of them none), for variety.
COMMENT_OPENINGS: tuple[str, ...] = _COMMENT_WORDS["COMMENT_OPENINGS"]
COMMENT_ENDINGS: tuple[str, ...] = _COMMENT_WORDS["COMMENT_ENDINGS"]
NEAR_DUPLICATE_SUFFIXES: tuple[str, ...] = _COMMENT_WORDS["NEAR_DUPLICATE_SUFFIXES"]
SPANISH_NOUNS: tuple[str, ...] = _COMMENT_WORDS["SPANISH_NOUNS"]
SPANISH_BENIGN: tuple[str, ...] = _COMMENT_WORDS["SPANISH_BENIGN"]
SPANISH_TOXIC: tuple[str, ...] = _COMMENT_WORDS["SPANISH_TOXIC"]

REASONS_AGAINST: tuple[str, ...] = _ANSWER_WORDS["REASONS_AGAINST"]
REASONS_FOR: tuple[str, ...] = _ANSWER_WORDS["REASONS_FOR"]
EXPLANATIONS: dict[str, tuple[str, ...]] = _ANSWER_WORDS["EXPLANATIONS"]

# --- how the teacher answers -------------------------------------------------------------------

RESPONSE_FORMATS = (
    "json_fenced",
    "json_bare",
    "python_dict",
    "explained_json",
    "plain_text",
    "cot_dict",
    "empty",
    "provider_error",
)
# Answer formats of a prompt that asks for a JSON object, in the proportions seen from GPT-4 and
# GPT-3.5 (mostly fenced JSON; some bare or single-quoted dicts; a few plain words).
PLAIN_PROMPT_FORMAT_WEIGHTS = {
    "json_fenced": 0.90,
    "json_bare": 0.05,
    "python_dict": 0.015,
    "explained_json": 0.01,
    "plain_text": 0.025,
}
PROVIDER_ERRORS = (  # message, share of errors, median latency in ms
    ("RateLimitError: 429 Rate limit reached for requests", 0.55, 80.0),
    ("APITimeoutError: Request timed out.", 0.15, 60_000.0),
    ("InternalServerError: 500 The server had an error while processing your request.", 0.12, 900.0),
    ("ServiceUnavailableError: 503 The engine is currently overloaded, please try again later.", 0.10, 300.0),
    ("APIConnectionError: Connection error.", 0.08, 2_000.0),
)
TENANTS = (("forum-web", 0.6), ("forum-ios", 0.25), ("forum-android", 0.15))
# UTC hour-of-day shape of traffic: quiet nights, busy evenings.
HOURLY_WEIGHTS = np.array([3, 2, 1.5, 1, 1, 1.2, 2, 3, 4, 5, 5.5, 6, 6.5, 6.5, 6.5, 7, 7.5, 8, 9, 9.5, 9, 8, 6, 4.5])

# --- faults in the log objects -----------------------------------------------------------------

MALFORMED_KINDS = (
    "truncated_json",
    "not_json",
    "missing_required_field",
    "wrong_type",
    "duplicate_request_id",
    "invalid_utf8",
)
MALFORMED_WEIGHTS = np.array([0.3, 0.2, 0.15, 0.15, 0.15, 0.05])
NOT_JSON_LINES = (
    "Traceback (most recent call last):",
    "<html><body><h1>502 Bad Gateway</h1></body></html>",
    "INFO flushing batch to storage",
    "request_id,timestamp,user_id,input",
    "\x00\x00\x00\x00",
)
REQUIRED_FIELDS_TO_DROP = ("request_id", "timestamp", "user_id", "model", "prompt_template_id", "input")
WRONG_TYPES = (("user_id", 12345), ("timestamp", 1704067200), ("input", ["a", "list"]), ("schema_version", "one"))


@dataclass(frozen=True)
class TrafficProfile:
    """The shape of simulated traffic; the defaults resemble a moderated comment section."""

    toxic_rate: float = 0.12
    teacher_accuracy: float = 0.94
    n_users: int = 20_000
    # User ranks are Zipf-Mandelbrot: P(rank r) ~ 1 / (r + offset) ** exponent. The offset keeps
    # the single busiest user near 3% of traffic rather than 15%.
    zipf_exponent: float = 1.1
    zipf_offset: float = 5.0
    # Share of calls made with the task's chain-of-thought prompts (those asking for extra keys).
    reasoning_prompt_share: float = 0.08
    error_rate: float = 0.012
    empty_rate: float = 0.004
    exact_duplicate_rate: float = 0.02
    near_duplicate_rate: float = 0.02
    spam_rate: float = 0.01
    malformed_rate: float = 0.002
    records_per_object: int = 5_000
    model: str = "openai/gpt-4-1106-preview"
    # Drift injection: this share of comments is written in Spanish (a new market arriving), drawn
    # from a generator of its own so that the rest of the day is the same bytes as without it.
    spanish_share: float = 0.0
    prompt_usd_per_million_tokens: float = 10.0
    completion_usd_per_million_tokens: float = 30.0
    # Served traffic: None writes teacher-only logs; 'dark', 'hybrid', 'canary' or 'full' puts a
    # student stand-in in front of users the way that rollout mode does.
    rollout: str | None = None
    student_train_id: str = "sim-student"
    # How often the student's label is the teacher's (the truth's where the teacher gave none).
    student_agreement: float = 0.93
    # Of the calls the student answers, the share the teacher is also asked about (call kind sample).
    sample_share: float = 0.2
    # canary: the share of users the student serves; hybrid: the confidence it answers from.
    canary_share: float = 0.3
    hybrid_threshold: float = 0.9
    student_latency_ms: float = 15.0
    # End users' verdicts on served answers, by whether the answer they got was right.
    thumbs_down_right: float = 0.02
    thumbs_down_wrong: float = 0.3
    regenerate_right: float = 0.01
    regenerate_wrong: float = 0.15
    # Verdicts arrive up to this many days after the call.
    feedback_lag_days: int = 2
    # Log the teacher's label distribution with every answer (as from its log-probabilities), from a
    # calibrated teacher: its confidence in an answer is the probability that the answer is right.
    # The concentration sets how far confidences spread (higher: closer to the row's accuracy).
    label_distributions: bool = False
    confidence_concentration: float = 2.0

    def __post_init__(self) -> None:
        rates = ("toxic_rate", "teacher_accuracy", "reasoning_prompt_share", "error_rate", "empty_rate")
        for name in rates:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.error_rate + self.empty_rate > 1.0:
            raise ValueError("error_rate + empty_rate must not exceed 1")
        if min(self.spam_rate, self.exact_duplicate_rate, self.near_duplicate_rate) < 0 or (
            self.spam_rate + self.exact_duplicate_rate + self.near_duplicate_rate > 1.0
        ):
            raise ValueError("spam, exact and near duplicate rates must be non-negative and sum to at most 1")
        if not 0.0 <= self.malformed_rate <= 0.5:
            raise ValueError("malformed_rate must be within [0, 0.5]: faults need valid lines to repeat")
        if not 0.0 <= self.spanish_share <= 1.0:
            raise ValueError("spanish_share must be within [0, 1]")
        if self.n_users < 1 or self.records_per_object < 1:
            raise ValueError("n_users and records_per_object must be positive")
        if self.rollout is not None and self.rollout not in ROLLOUT_MODES:
            raise ValueError(f"rollout must be one of {', '.join(ROLLOUT_MODES)} (or None for teacher-only traffic)")
        served_rates = (
            "student_agreement", "sample_share", "canary_share", "hybrid_threshold", "thumbs_down_right",
            "thumbs_down_wrong", "regenerate_right", "regenerate_wrong",
        )  # fmt: skip
        for name in served_rates:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.feedback_lag_days < 0 or self.student_latency_ms < 0:
            raise ValueError("feedback_lag_days and student_latency_ms must not be negative")
        if self.confidence_concentration <= 0:
            raise ValueError("confidence_concentration must be positive")


@dataclass(frozen=True)
class SimulationSummary:
    """What was written; formats and accuracy are over the valid records only."""

    days: tuple[str, ...]
    lines_written: int
    valid_records: int
    object_keys: tuple[str, ...]
    response_formats: dict[str, int]
    malformed: dict[str, int]
    users: int
    true_positive_rate: float
    teacher_accuracy: float
    #: Rows of the gold table written (0: none was).
    gold_rows: int = 0
    #: Served traffic only: valid records per call kind, the stand-in's agreement with the teacher
    #: where both answered, and the feedback events written to the stream.
    call_kinds: dict[str, int] = field(default_factory=dict)
    student_agreement: float = 0.0
    feedback_events: int = 0
    feedback_keys: tuple[str, ...] = ()


def simulate_traffic(
    store: ObjectStore,
    *,
    days: list[str],
    records_per_day: int,
    seed: int,
    task: Task,
    profile: TrafficProfile | None = None,
    corpus_path: str | Path | None = None,
    corpus_text_column: str = "comment_text",
    corpus_label_column: str | None = None,
    gold_fraction: float = 0.0,
) -> SimulationSummary:
    """Write ``records_per_day`` log lines per day under ``logs/dt=DAY/sim-<seed>-<part>.jsonl``.

    With ``corpus_path`` (CSV, Parquet or JSONL) the inputs and true labels are sampled from that
    table (label column default: the task's label field) instead of generated. With
    ``gold_fraction`` > 0, the true labels of that share of the distinct valid inputs (a seeded
    sample) are written as the store's gold table, as if people had labelled them: evaluation
    then scores the teacher and the students against the truth. Texts drawn with two different
    true labels are left out of it.
    """
    if not 0.0 <= gold_fraction <= 1.0:
        raise ValueError("gold_fraction must be between 0 and 1")
    profile = profile or TrafficProfile()
    source = _TrafficSource(task, profile, seed, corpus_path, corpus_text_column, corpus_label_column)
    keys: list[str] = []
    malformed = np.zeros(len(MALFORMED_KINDS) + 1, np.int64)
    formats = np.zeros(len(RESPONSE_FORMATS), np.int64)
    users: set[str] = set()
    lines_written = positives = answered = correct = 0
    call_kinds: dict[str, int] = {}
    pairs = agreed = 0
    feedback_events: dict[str, list[str]] = {}
    truth_by_text: dict[str, int | None] = {}
    con = duckdb.connect()
    try:
        for day in days:
            drawn = source.day(day, records_per_day)
            lines = _with_faults(_render_lines(con, drawn.table, task), drawn)
            sizes = _batch_sizes(len(lines), profile.records_per_object, drawn.rng)
            keys += publish_day_objects(store, day, f"sim-{seed}", object_payloads(lines, sizes))

            lines_written += len(lines)
            valid = drawn.line_kind == 0
            malformed += np.bincount(drawn.line_kind, minlength=len(malformed))
            formats += np.bincount(drawn.response_format[valid], minlength=len(formats))
            users.update(pc.unique(drawn.table["user_id"].filter(pa.array(valid))).to_pylist())
            truth, teacher = drawn.truth[valid], drawn.teacher[valid]
            positives += int((truth == source.positive).sum())
            has_answer = ~np.isnan(teacher)
            answered += int(has_answer.sum())
            correct += int((teacher[has_answer] == truth[has_answer]).sum())
            if drawn.served is not None:
                served = drawn.served
                for kind, count in zip(*np.unique(served.call_kind[valid], return_counts=True), strict=True):
                    call_kinds[str(kind)] = call_kinds.get(str(kind), 0) + int(count)
                both = valid & ~np.isnan(drawn.teacher) & ~np.isnan(served.student_label)
                pairs += int(both.sum())
                agreed += int((served.student_label[both] == drawn.teacher[both]).sum())
                for event in (e for e, row in zip(served.events, served.event_rows, strict=True) if valid[row]):
                    feedback_events.setdefault(event.day, []).append(event.to_json())
            if gold_fraction > 0:
                texts = drawn.table["input"].filter(pa.array(valid)).to_pylist()
                for text, value in zip(texts, truth.tolist(), strict=True):
                    # A text seen with two truths is ambiguous: no person could label it right.
                    known = truth_by_text.setdefault(text, int(value))
                    if known is not None and known != int(value):
                        truth_by_text[text] = None
    finally:
        con.close()
    gold_rows = 0
    if gold_fraction > 0:
        gold_rows = _write_gold_sample(store, truth_by_text, gold_fraction, seed)
    feedback_keys = []
    for event_day, lines in sorted(feedback_events.items()):
        key = feedback_object_key(event_day, f"sim-{seed}-{'-'.join(days[:1])}-{len(days)}d")
        store.put_bytes(key, encode_log_object(lines))
        feedback_keys.append(key)
    valid_records = lines_written - int(malformed[1:].sum())
    return SimulationSummary(
        days=tuple(days),
        lines_written=lines_written,
        valid_records=valid_records,
        object_keys=tuple(keys),
        response_formats={name: int(count) for name, count in zip(RESPONSE_FORMATS, formats, strict=True)},
        malformed={kind: int(count) for kind, count in zip(MALFORMED_KINDS, malformed[1:], strict=True)},
        users=len(users),
        true_positive_rate=positives / valid_records if valid_records else 0.0,
        teacher_accuracy=correct / answered if answered else 0.0,
        gold_rows=gold_rows,
        call_kinds=call_kinds,
        student_agreement=agreed / pairs if pairs else 0.0,
        feedback_events=sum(len(lines) for lines in feedback_events.values()),
        feedback_keys=tuple(feedback_keys),
    )


def _write_gold_sample(store: ObjectStore, truth_by_text: dict[str, int | None], fraction: float, seed: int) -> int:
    """A seeded share of the unambiguous texts with their true labels, as the store's gold table."""
    texts = sorted(text for text, value in truth_by_text.items() if value is not None)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(texts), size=round(fraction * len(texts)), replace=False).tolist())
    table = pa.table(
        {
            GOLD_TEXT: pa.array([texts[i] for i in chosen], pa.string()),
            GOLD_LABEL: pa.array([truth_by_text[texts[i]] for i in chosen], pa.int64()),
        }
    )
    with tempfile.TemporaryDirectory(prefix="distill-gold-") as directory:
        path = Path(directory) / "labels.parquet"
        pq.write_table(table, path)
        store.put_file(GOLD_LABELS, path)
    return table.num_rows


def generate_traffic(
    *,
    days: list[str],
    records_per_day: int,
    seed: int,
    task: Task,
    profile: TrafficProfile | None = None,
    corpus_path: str | Path | None = None,
    corpus_text_column: str = "comment_text",
    corpus_label_column: str | None = None,
) -> pa.Table:
    """The simulated calls as a table (with hidden truth), without writing anything.

    The same rows :func:`simulate_traffic` writes for the same arguments; ``line_kind`` says
    which rows are written as malformed lines instead of valid records.
    """
    profile = profile or TrafficProfile()
    source = _TrafficSource(task, profile, seed, corpus_path, corpus_text_column, corpus_label_column)
    return pa.concat_tables([source.day(day, records_per_day).table for day in days])


# --- generation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DrawnDay:
    """One day of calls: the table, and the codes the writer and the summary need."""

    table: pa.Table
    line_kind: np.ndarray  # 0: a valid record; k: written as MALFORMED_KINDS[k - 1]
    duplicate_of: np.ndarray  # the line a duplicate_request_id line repeats, else -1
    response_format: np.ndarray  # index into RESPONSE_FORMATS
    truth: np.ndarray
    teacher: np.ndarray  # the teacher's label, NaN where it gave none
    rng: np.random.Generator  # to keep drawing from (faults, batch sizes)
    served: _ServedCalls | None = None  # with a rollout mode: who answered each call, and the feedback


@dataclass(frozen=True)
class _ServedCalls:
    call_kind: np.ndarray  # str per call
    student_label: np.ndarray  # float, NaN where the student did not run
    events: list[FeedbackEvent]
    event_rows: list[int]  # the call each event is about


class _TrafficSource:
    """Draws one day of calls at a time; holds what is shared by all days (users, corpus)."""

    def __init__(
        self,
        task: Task,
        profile: TrafficProfile,
        seed: int,
        corpus_path: str | Path | None,
        corpus_text_column: str,
        corpus_label_column: str | None,
    ) -> None:
        if not task.prompts:
            raise ValueError(f"task {task.id!r} has no prompts to simulate")
        if len(task.label.values) < 2:
            raise ValueError("the task's label needs at least two values")
        self.task = task
        self.profile = profile
        self.seed = seed
        values = list(task.label.values)
        self.positive = task.label.positive if task.label.positive is not None else values[-1]
        self.negative = next(v for v in values if v != self.positive)
        population = np.random.default_rng(np.random.SeedSequence([seed, 0]))
        codes = population.choice(16**8, size=profile.n_users, replace=False)
        self.user_ids = pa.array([f"user-{code:08x}" for code in codes.tolist()], pa.string())
        weights = 1.0 / (np.arange(1, profile.n_users + 1) + profile.zipf_offset) ** profile.zipf_exponent
        self.user_weights = weights / weights.sum()
        self.prompts = list(task.prompts.values())
        self.reason_keys = [_reason_keys(p, task.label.field) for p in self.prompts]
        self.prompt_weights = _prompt_weights(self.reason_keys, profile.reasoning_prompt_share)
        self.corpus = (
            None
            if corpus_path is None
            else _load_corpus(corpus_path, corpus_text_column, corpus_label_column or task.label.field, task)
        )

    def day(self, day: str, n: int) -> _DrawnDay:
        """The calls of one day, in time order, and the generator to continue drawing from."""
        if n < 1:
            raise ValueError("records_per_day must be positive")
        date = dt.date.fromisoformat(day)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, date.toordinal()]))
        profile, label = self.profile, self.task.label

        # Inputs and their hidden truth.
        if self.corpus is None:
            texts, truth, kind = self._generated_texts(rng, n)
        else:
            texts_all, labels_all = self.corpus
            picked = rng.integers(len(labels_all), size=n)
            texts, truth, kind = texts_all.take(picked), labels_all[picked], np.full(n, _CORPUS, np.int8)
        texts, truth, kind, users = self._duplicates_and_spam(rng, texts, truth, kind)
        if profile.spanish_share > 0:
            texts = _spanish_comments(
                texts, truth == self.positive, kind != _SPAM, profile.spanish_share, self.seed, date
            )

        # The teacher: wrong on a share of calls, more often on the borderline ones.
        weight = np.where(kind == _BORDERLINE, 5.0, 1.0)
        error_rate = np.minimum(1.0, (1 - profile.teacher_accuracy) * n * weight / weight.sum())
        wrong = rng.random(n) < error_rate
        values = np.array(label.values)
        sorter = np.argsort(values)
        truth_index = sorter[np.searchsorted(values, truth, sorter=sorter)]
        answer_index = np.where(wrong, (truth_index + rng.integers(1, len(values), size=n)) % len(values), truth_index)

        prompt_index = rng.choice(len(self.prompts), size=n, p=self.prompt_weights)
        response_format = self._formats(rng, prompt_index)
        responses = self._responses(rng, response_format, answer_index, prompt_index)
        is_error = response_format == RESPONSE_FORMATS.index("provider_error")
        teacher = np.where(
            is_error | (response_format == RESPONSE_FORMATS.index("empty")), np.nan, values[answer_index]
        )
        error_index = rng.choice(len(PROVIDER_ERRORS), size=n, p=[e[1] for e in PROVIDER_ERRORS])
        errors = pa.array([e[0] for e in PROVIDER_ERRORS]).take(pa.array(error_index, mask=~is_error))

        # Usage, latency and cost the way a provider reports them.
        template_chars = np.array([len(p.text) - len(p.placeholder) for p in self.prompts])[prompt_index]
        prompt_tokens = np.ceil((template_chars + pc.utf8_length(texts).to_numpy()) / 4).astype(np.int64)
        response_chars = pc.fill_null(pc.utf8_length(responses), 0).to_numpy()
        completion_tokens = np.where(is_error, 0, np.ceil(response_chars / 4).astype(np.int64) + 1)
        usage = pa.StructArray.from_arrays(
            [pa.array(prompt_tokens), pa.array(completion_tokens), pa.array(prompt_tokens + completion_tokens)],
            names=["prompt_tokens", "completion_tokens", "total_tokens"],
            mask=pa.array(is_error),
        )
        latency = rng.lognormal(np.log(380.0), 0.35, size=n) + 22.0 * completion_tokens + 0.05 * prompt_tokens
        latency *= np.where(rng.random(n) < 0.01, rng.uniform(3.0, 12.0, size=n), 1.0)
        error_latency = np.array([e[2] for e in PROVIDER_ERRORS])[error_index] * rng.lognormal(0.0, 0.3, size=n)
        latency = np.round(np.where(is_error, error_latency, latency), 1)
        cost = np.round(
            (
                prompt_tokens * profile.prompt_usd_per_million_tokens
                + completion_tokens * profile.completion_usd_per_million_tokens
            )
            / 1e6,
            8,
        )
        cost = np.where(is_error, 0.0, cost)
        max_tokens = np.where(np.array([bool(k) for k in self.reason_keys])[prompt_index], 512, 256)
        params = pa.StructArray.from_arrays(
            [pa.array(np.zeros(n)), pa.array(max_tokens)], names=["temperature", "max_tokens"]
        )
        thumbs = rng.random(n)
        feedback = pa.StructArray.from_arrays(
            [pa.array(["up", "down"]).take((thumbs < 0.003).astype(np.int8))],
            names=["thumbs"],
            mask=pa.array(thumbs >= 0.006),
        )

        # When: a daily rhythm, in time order as a logging client writes them.
        hours = rng.choice(24, size=n, p=HOURLY_WEIGHTS / HOURLY_WEIGHTS.sum())
        millis = np.sort(hours * 3_600_000 + rng.integers(3_600_000, size=n))
        stamps = np.datetime_as_string(np.datetime64(day) + millis.astype("timedelta64[ms]"), unit="ms")
        timestamps = pc.binary_join_element_wise(pa.array(stamps), "Z", "")

        request_ids = pa.array(np.frombuffer(rng.bytes(16 * n).hex().encode(), dtype="S32")).cast(pa.string())
        tenants = rng.choice(len(TENANTS), size=n, p=[t[1] for t in TENANTS])
        line_kind, duplicate_of = _fault_plan(rng, n, profile.malformed_rate)
        table = pa.table(
            {
                "day": pa.repeat(day, n),
                "line_kind": pa.array(("valid", *MALFORMED_KINDS)).take(line_kind),
                "duplicate_of": pa.array(duplicate_of, pa.int64(), mask=duplicate_of < 0),
                "request_id": request_ids,
                "timestamp": timestamps,
                "user_id": users,
                "tenant_id": pa.array([t[0] for t in TENANTS]).take(tenants),
                "model": pa.repeat(profile.model, n),
                "params": params,
                "prompt_template_id": pa.array([p.id for p in self.prompts]).take(prompt_index),
                "prompt_template_version": pa.array([p.version for p in self.prompts]).take(prompt_index),
                "input": texts,
                "response": responses,
                "usage": usage,
                "latency_ms": pa.array(latency),
                "cost_usd": pa.array(cost),
                "error": errors,
                "feedback": feedback,
                "true_label": pa.array(truth.astype(np.int64)),
                "teacher_label": pa.array(teacher, pa.float64(), from_pandas=True).cast(pa.int64()),
                "response_format": pa.array(RESPONSE_FORMATS).take(response_format),
                "text_kind": pa.array(_TEXT_KINDS).take(kind),
            }
        )
        if profile.label_distributions and len(values) == 2:
            # A generator of its own, so the calls are the same bytes as without distributions.
            soft_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 4, date.toordinal()]))
            table = table.append_column(
                "label_distribution",
                _label_distributions(soft_rng, values, answer_index, wrong, error_rate, teacher, profile),
            )
        if profile.rollout is None:
            return _DrawnDay(table, line_kind, duplicate_of, response_format, truth, teacher, rng)
        # A generator of its own, so the calls themselves are the same bytes as without a rollout.
        serving_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 3, date.toordinal()]))
        table, teacher, served = self._serve(serving_rng, table, truth, teacher, millis, date)
        return _DrawnDay(table, line_kind, duplicate_of, response_format, truth, teacher, rng, served)

    def _serve(
        self,
        rng: np.random.Generator,
        table: pa.Table,
        truth: np.ndarray,
        teacher: np.ndarray,
        millis: np.ndarray,
        date: dt.date,
    ) -> tuple[pa.Table, np.ndarray, _ServedCalls]:
        """The day's calls as a deployment in ``profile.rollout`` mode answers and logs them."""
        profile, n = self.profile, len(truth)
        values = np.array(self.task.label.values)
        failed = table["error"].is_valid().to_numpy(zero_copy_only=False) & np.isnan(teacher)
        # The stand-in's confidence is calibrated: it agrees with the teacher as often as it is sure.
        strength = 10.0
        confidence = np.clip(
            rng.beta(profile.student_agreement * strength, (1 - profile.student_agreement) * strength + 1e-9, size=n),
            0.5,
            0.999,
        )
        reference = np.where(np.isnan(teacher), truth, teacher)
        agrees = rng.random(n) < confidence
        others = (np.searchsorted(values, reference) + rng.integers(1, len(values), size=n)) % len(values)
        student_label = np.where(agrees, reference, values[others]).astype(float)

        mode = profile.rollout
        if mode == "dark":
            student_serves = np.zeros(n, bool)
            student_ran = np.ones(n, bool)
        elif mode == "hybrid":
            student_serves = confidence >= profile.hybrid_threshold
            student_ran = np.ones(n, bool)
        elif mode == "canary":
            users = table["user_id"].to_pylist()
            student_serves = np.array([_user_bucket(user) < profile.canary_share for user in users], bool)
            student_ran = student_serves
        else:
            student_serves = np.ones(n, bool)
            student_ran = np.ones(n, bool)
        sampled = student_serves & (rng.random(n) < profile.sample_share)
        teacher_kind = {"dark": "shadow", "hybrid": "deferred"}.get(str(mode), "teacher")
        call_kind = np.where(student_serves, np.where(sampled, "sample", "student"), teacher_kind).astype(object)
        fallback = ~student_serves & student_ran & failed
        call_kind[fallback] = "fallback"
        teacher_asked = ~(call_kind == "student")
        served_by = np.where(student_serves | fallback, "student", "teacher")

        student_label = np.where(student_ran, student_label, np.nan)
        teacher = np.where(teacher_asked, teacher, np.nan)
        alone = pa.array(~teacher_asked)
        student_ms = np.round(rng.lognormal(np.log(profile.student_latency_ms), 0.3, size=n), 1)
        label_values = pa.array(np.nan_to_num(student_label, nan=values[0]).astype(np.int64))
        student = pa.StructArray.from_arrays(
            [
                pa.repeat(profile.student_train_id, n),
                label_values,
                pa.array(np.round(confidence, 4)),
                pa.array(student_ms),
            ],
            names=["train_id", "label", "confidence", "latency_ms"],
            mask=pa.array(~student_ran),
        )
        columns = {
            "served_by": pa.array(served_by.astype(str)),
            "rollout": pa.repeat(str(mode), n),
            "call_kind": pa.array(call_kind.astype(str)),
            "student": student,
            "response": pc.if_else(alone, pa.nulls(n, pa.string()), table["response"]),
            "usage": pc.if_else(alone, pa.nulls(n, table["usage"].type), table["usage"]),
            "cost_usd": pc.if_else(alone, 0.0, table["cost_usd"]),
            "latency_ms": pc.if_else(alone, pa.array(student_ms), table["latency_ms"]),
        }
        for name, column in columns.items():
            table = (
                table.append_column(name, column)
                if name not in table.column_names
                else table.set_column(table.column_names.index(name), name, column)
            )

        # What the user got, and what they made of it.
        answer = np.where(served_by == "student", student_label, teacher)
        wrong = ~np.isnan(answer) & (answer != truth)
        got_answer = ~np.isnan(answer)
        down = got_answer & (rng.random(n) < np.where(wrong, profile.thumbs_down_wrong, profile.thumbs_down_right))
        regenerate = got_answer & (rng.random(n) < np.where(wrong, profile.regenerate_wrong, profile.regenerate_right))
        delay_ms = rng.integers(60_000, max(1, profile.feedback_lag_days) * 86_400_000 + 60_000, size=n)
        if profile.feedback_lag_days == 0:
            delay_ms = np.minimum(delay_ms, 86_400_000 - 1 - millis)
        stamps = np.datetime_as_string(
            np.datetime64(date.isoformat()) + (millis + delay_ms).astype("timedelta64[ms]"), unit="ms"
        )
        request_ids = table["request_id"].to_pylist()
        user_ids = table["user_id"].to_pylist()
        events, rows = [], []
        for row in np.flatnonzero(down | regenerate).tolist():
            verdict: dict[str, Any] = {}
            if down[row]:
                verdict["thumbs"] = "down"
            if regenerate[row]:
                verdict["regenerate"] = True
            events.append(FeedbackEvent(request_ids[row], verdict, user_ids[row], f"{stamps[row]}Z"))
            rows.append(row)
        return table, teacher, _ServedCalls(call_kind.astype(str), student_label, events, rows)

    def _generated_texts(self, rng: np.random.Generator, n: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        profile = self.profile
        toxic = rng.random(n) < profile.toxic_rate
        benign_kind = rng.choice([_BENIGN, _TINY, _BORDERLINE], size=n, p=[0.92, 0.04, 0.04])
        kind = np.where(toxic, _TOXIC, benign_kind).astype(np.int8)
        topic = rng.integers(len(TOPIC_NOUNS), size=n)

        # Sentences per comment: mostly one to three, a long tail of essays, and rare walls of
        # text longer than any sensible length limit.
        sentences = np.minimum(rng.geometric(0.55, size=n), 6)
        length_roll = rng.random(n)
        sentences = np.where(length_roll < 0.015, rng.integers(8, 40, size=n), sentences)
        sentences = np.where(length_roll < 0.001, rng.integers(60, 120, size=n), sentences)
        sentences = np.where(kind == _TINY, 1, sentences)
        offsets = np.concatenate([[0], np.cumsum(sentences)])
        owner = np.repeat(np.arange(n), sentences)
        core = offsets[:-1] + (rng.random(n) * sentences).astype(np.int64)
        sentence_group = np.full(len(owner), _FILLER, np.int8)
        sentence_group[core] = kind
        # One template index space over all sentence kinds, so a single pass fills every sentence.
        templates = [template for group in _SENTENCE_TEMPLATES for template in group]
        sizes = np.array([len(group) for group in _SENTENCE_TEMPLATES])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        template = starts[sentence_group] + (rng.random(len(owner)) * sizes[sentence_group]).astype(np.int64)
        sentence_topic = topic[owner]
        flat = _assemble(template, len(templates), lambda t, rows: _fill(templates[t], sentence_topic[rows], rng))
        texts = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat), " ")
        shouting = toxic & (rng.random(n) < 0.15)
        texts = _replace_rows(texts, shouting, pc.utf8_upper(texts.filter(shouting)))
        framed = kind != _TINY
        count = int(framed.sum())
        openings = pa.array(COMMENT_OPENINGS).take(rng.integers(len(COMMENT_OPENINGS), size=count))
        endings = pa.array(COMMENT_ENDINGS).take(rng.integers(len(COMMENT_ENDINGS), size=count))
        texts = _replace_rows(texts, framed, pc.binary_join_element_wise(openings, texts.filter(framed), endings, ""))
        replies = framed & (rng.random(n) < 0.1)
        names = _SLOT_ARRAYS["name"].take(rng.integers(len(SLOT_WORDS["name"]), size=int(replies.sum())))
        texts = _replace_rows(texts, replies, pc.binary_join_element_wise("@", names, " ", texts.filter(replies), ""))
        truth = np.where(toxic, self.positive, self.negative)
        return texts, truth, kind

    def _duplicates_and_spam(
        self, rng: np.random.Generator, texts: pa.Array, truth: np.ndarray, kind: np.ndarray
    ) -> tuple[pa.Array, np.ndarray, np.ndarray, pa.Array]:
        """Copy-paste spam from a few accounts, exact reposts and lightly edited reposts."""
        profile, n = self.profile, len(truth)
        users = self.user_ids.take(rng.choice(len(self.user_weights), size=n, p=self.user_weights))
        roll = rng.random(n)
        spam = roll < profile.spam_rate
        exact = (roll >= profile.spam_rate) & (roll < profile.spam_rate + profile.exact_duplicate_rate)
        near = roll >= 1 - profile.near_duplicate_rate
        source = np.arange(n)
        copied = exact | near
        source[copied] = rng.integers(n, size=int(copied.sum()))
        texts, truth, kind = texts.take(source), truth[source], kind[source]
        kind = np.where(exact, _EXACT_DUPLICATE, np.where(near, _NEAR_DUPLICATE, kind)).astype(np.int8)

        originals = texts.filter(near)
        suffixes = pa.array(NEAR_DUPLICATE_SUFFIXES).take(
            rng.integers(len(NEAR_DUPLICATE_SUFFIXES), size=len(originals))
        )
        edited = pc.if_else(
            pa.array(rng.random(len(originals)) < 0.3),
            pc.utf8_lower(originals),
            pc.binary_join_element_wise(originals, suffixes, ""),
        )
        texts = _replace_rows(texts, near, edited)

        texts = _replace_rows(
            texts, spam, pa.array(SPAM_TEXTS).take(rng.integers(len(SPAM_TEXTS), size=int(spam.sum())))
        )
        truth = np.where(spam, self.negative, truth)
        kind = np.where(spam, _SPAM, kind).astype(np.int8)
        # A handful of spam accounts from the quiet tail of the population send all of it.
        spammers = self.user_ids.slice(max(0, len(self.user_ids) - 5))
        users = _replace_rows(users, spam, spammers.take(rng.integers(len(spammers), size=int(spam.sum()))))
        return texts, truth, kind, users

    def _formats(self, rng: np.random.Generator, prompt_index: np.ndarray) -> np.ndarray:
        n = len(prompt_index)
        profile = self.profile
        plain_names = list(PLAIN_PROMPT_FORMAT_WEIGHTS)
        plain_weights = np.array(list(PLAIN_PROMPT_FORMAT_WEIGHTS.values()))
        plain = np.array([RESPONSE_FORMATS.index(name) for name in plain_names])[
            rng.choice(len(plain_names), size=n, p=plain_weights / plain_weights.sum())
        ]
        reasoning = np.array([bool(k) for k in self.reason_keys])[prompt_index]
        formats = np.where(reasoning, RESPONSE_FORMATS.index("cot_dict"), plain)
        roll = rng.random(n)
        formats = np.where(roll < profile.empty_rate, RESPONSE_FORMATS.index("empty"), formats)
        formats = np.where(roll >= 1 - profile.error_rate, RESPONSE_FORMATS.index("provider_error"), formats)
        return formats.astype(np.int8)

    def _responses(
        self, rng: np.random.Generator, response_format: np.ndarray, answer: np.ndarray, prompt_index: np.ndarray
    ) -> pa.Array:
        label = self.task.label
        key = label.field
        values = [str(v) for v in label.values]
        polarity = ["positive" if v == self.positive else "negative" for v in label.values]
        plain_words = [_plain_word(label.aliases, v, label.name_of(v)) for v in label.values]

        def pick(options: list[str], rows: np.ndarray) -> pa.Array:
            return pa.array(options).take(answer[rows])

        def build(fmt: int, rows: np.ndarray) -> pa.Array:
            name = RESPONSE_FORMATS[fmt]
            if name == "json_fenced":
                return pick([f'```json\n{{\n  "{key}": {v}\n}}\n```' for v in values], rows)
            if name == "json_bare":
                one_line = pick([f'{{"{key}": {v}}}' for v in values], rows)
                indented = pick([f'{{\n  "{key}": {v}\n}}' for v in values], rows)
                return pc.if_else(pa.array(rng.random(len(rows)) < 0.5), one_line, indented)
            if name == "python_dict":
                return pick([f"{{'{key}': {v}}}" for v in values], rows)
            if name == "explained_json":
                explanation = pa.array([EXPLANATIONS[p][0] for p in polarity]).take(answer[rows])
                other = pa.array([EXPLANATIONS[p][1] for p in polarity]).take(answer[rows])
                explanation = pc.if_else(pa.array(rng.random(len(rows)) < 0.5), explanation, other)
                return pc.binary_join_element_wise(
                    explanation, "\n\n", pick([f'```json\n{{\n  "{key}": {v}\n}}\n```' for v in values], rows), ""
                )
            if name == "plain_text":
                variant = rng.integers(3, size=len(rows))
                options = [w for word in plain_words for w in (word, word.capitalize(), word.capitalize() + ".")]
                return pa.array(options).take(answer[rows] * 3 + variant)
            if name == "cot_dict":
                return _assemble(
                    prompt_index[rows],
                    len(self.prompts),
                    lambda prompt, within: self._cot(rng, self.reason_keys[prompt], answer[rows[within]], values),
                )
            if name == "empty":
                return pa.repeat("", len(rows))
            return pa.nulls(len(rows), pa.string())

        return _assemble(response_format, len(RESPONSE_FORMATS), build)

    def _cot(
        self, rng: np.random.Generator, reason_keys: tuple[str, ...], answer: np.ndarray, values: list[str]
    ) -> pa.Array:
        """A Python-dict answer: one reason per extra key of the prompt, then the label.

        Reason keys alternate between arguing for the negative and the positive label, as the
        toxicity prompt's ``reason_innocent`` and ``reason_toxic`` do.
        """
        pieces: list[pa.Array | str] = ["{"]
        for position, reason_key in enumerate(reason_keys):
            pool = REASONS_AGAINST if position % 2 == 0 else REASONS_FOR
            reasons = pa.array(pool).take(rng.integers(len(pool), size=len(answer)))
            word = reason_key.split("_", 1)[-1].replace("_", " ")
            pieces += [f"'{reason_key}': 'The comment might be {word} because ", reasons, ".',\n "]
        pieces += [f"'{self.task.label.field}': ", pa.array(values).take(answer), "}"]
        return pc.binary_join_element_wise(*pieces, "")


_BENIGN, _TOXIC, _BORDERLINE, _TINY, _FILLER, _SPAM, _EXACT_DUPLICATE, _NEAR_DUPLICATE, _CORPUS = range(9)
_TEXT_KINDS = ("benign", "toxic", "borderline", "tiny", "filler", "spam", "exact_duplicate", "near_duplicate", "corpus")
# Indexed by the sentence kinds _BENIGN .. _FILLER.
_SENTENCE_TEMPLATES = (BENIGN_TEMPLATES, TOXIC_TEMPLATES, BORDERLINE_TEMPLATES, TINY_TEXTS, FILLER_TEMPLATES)
_TOPIC_FLAT = pa.array([noun for nouns in TOPIC_NOUNS.values() for noun in nouns])
_TOPIC_SIZES = np.array([len(nouns) for nouns in TOPIC_NOUNS.values()])
_TOPIC_STARTS = np.concatenate([[0], np.cumsum(_TOPIC_SIZES)[:-1]])
_SLOT_ARRAYS = {slot: pa.array(words) for slot, words in SLOT_WORDS.items()}
_FORMATTER = string.Formatter()


def _label_distributions(
    rng: np.random.Generator,
    values: np.ndarray,
    answer_index: np.ndarray,
    wrong: np.ndarray,
    error_rate: np.ndarray,
    teacher: np.ndarray,
    profile: TrafficProfile,
) -> pa.Array:
    """A calibrated teacher's distribution over the two labels, per call (null where it gave no label).

    The teacher answers with its likelier label, so its confidence c lies in [1/2, 1]: c = (1 + x) / 2
    with x ~ Beta at the mean that makes E[c] the row's accuracy. Given whether the answer is right,
    c is drawn from that distribution weighted by c (right) or 1 - c (wrong), by rejection; then,
    by Bayes, an answer given with confidence c is right with probability exactly c.
    """
    accuracy = 1.0 - error_rate
    mean_x = np.clip(2.0 * accuracy - 1.0, 0.02, 0.98)
    a, b = mean_x * profile.confidence_concentration, (1 - mean_x) * profile.confidence_concentration
    confidence = np.full(len(wrong), np.nan)
    todo = np.arange(len(wrong))
    while len(todo):
        candidate = 0.5 + 0.5 * rng.beta(a[todo], b[todo])
        # Acceptance in [0, 1]: c for a right answer, (1 - c) / (1/2) for a wrong one.
        accept = rng.random(len(todo)) < np.where(wrong[todo], 2.0 * (1.0 - candidate), candidate)
        confidence[todo[accept]] = candidate[accept]
        todo = todo[~accept]
    p_answer = np.round(confidence, 4)
    p_second = np.round(1.0 - p_answer, 4)
    first_is_answer = answer_index == 0
    columns = [np.where(first_is_answer, p_answer, p_second), np.where(first_is_answer, p_second, p_answer)]
    return pa.StructArray.from_arrays(
        [pa.array(column) for column in columns], names=[str(v) for v in values], mask=pa.array(np.isnan(teacher))
    )


def _user_bucket(user_id: str) -> float:
    """A user's place in [0, 1), the same on every day: a canary serves the same users throughout."""
    import hashlib

    return int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:8], "big") / 2**64


def _fill(template: str, topic: np.ndarray, rng: np.random.Generator) -> pa.Array:
    """``template`` with each ``{slot}`` filled by a random word, one row per entry of ``topic``."""
    n = len(topic)
    pieces: list[pa.Array | str] = []
    for literal, slot, _spec, _conversion in _FORMATTER.parse(template):
        if literal:
            pieces.append(literal)
        if slot == "noun":
            picked = _TOPIC_STARTS[topic] + (rng.random(n) * _TOPIC_SIZES[topic]).astype(np.int64)
            pieces.append(_TOPIC_FLAT.take(picked))
        elif slot is not None:
            words = _SLOT_ARRAYS[slot]
            pieces.append(words.take(rng.integers(len(words), size=n)))
    if not any(isinstance(piece, pa.Array) for piece in pieces):
        return pa.repeat(template, n)
    return pc.binary_join_element_wise(*pieces, "")


def _spanish_comments(
    texts: pa.Array, toxic: np.ndarray, eligible: np.ndarray, share: float, seed: int, date: dt.date
) -> pa.Array:
    """``texts`` with a ``share`` of the eligible rows rewritten as Spanish comments of the same label."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, date.toordinal()]))
    rows = np.flatnonzero(eligible & (rng.random(len(texts)) < share))
    values = texts.to_pylist()
    for row in rows.tolist():
        templates = SPANISH_TOXIC if toxic[row] else SPANISH_BENIGN
        template = templates[int(rng.integers(len(templates)))]
        values[row] = template.format(noun=SPANISH_NOUNS[int(rng.integers(len(SPANISH_NOUNS)))])
    return pa.array(values, pa.string())


def _assemble(group: np.ndarray, n_groups: int, build: Callable[[int, np.ndarray], pa.Array]) -> pa.Array:
    """One string per row, built group by group (``build(g, rows)``) and put back in row order."""
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=n_groups)
    parts, start = [], 0
    for index, count in enumerate(counts):
        if count:
            parts.append(build(index, order[start : start + count]).cast(pa.string()))
        start += count
    if not parts:
        return pa.array([], pa.string())
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return pa.concat_arrays(parts).take(inverse)


def _replace_rows(values: pa.Array, mask: np.ndarray, replacements: pa.Array) -> pa.Array:
    """``values`` with the rows where ``mask`` is set replaced, in order, by ``replacements``.

    A take over the concatenation: several times faster than ``if_else`` on long strings.
    """
    index = np.arange(len(values))
    index[mask] = len(values) + np.arange(len(replacements))
    return pa.concat_arrays([values, replacements.cast(values.type)]).take(index)


def _reason_keys(prompt: PromptTemplate, label_field: str) -> tuple[str, ...]:
    """Extra keys a prompt asks for besides the label (``'reason_toxic'`` ...): a chain of thought."""
    quoted = re.findall(r"'([A-Za-z_][A-Za-z0-9_]*)'", prompt.text)
    return tuple(dict.fromkeys(key for key in quoted if key != label_field))


def _prompt_weights(reason_keys: list[tuple[str, ...]], reasoning_share: float) -> np.ndarray:
    reasoning = np.array([bool(keys) for keys in reason_keys])
    if reasoning.all() or not reasoning.any():
        return np.full(len(reasoning), 1.0 / len(reasoning))
    return np.where(reasoning, reasoning_share / reasoning.sum(), (1 - reasoning_share) / (~reasoning).sum())


def _plain_word(aliases: dict[str, int], value: int, name: str) -> str:
    words = [alias for alias, aliased in aliases.items() if aliased == value and alias.isalpha()]
    return words[0] if words else name


def _load_corpus(path: str | Path, text_column: str, label_column: str, task: Task) -> tuple[pa.Array, np.ndarray]:
    table = read_source_table(path)
    missing = [c for c in (text_column, label_column) if c not in table.column_names]
    if missing:
        raise ValueError(f"corpus {str(path)!r} lacks column(s) {missing}; it has {table.column_names}")
    table = table.filter(pc.and_(pc.is_valid(table[text_column]), pc.is_valid(table[label_column])))
    if table.num_rows == 0:
        raise ValueError(f"corpus {str(path)!r} has no rows with both a text and a label")
    labels = table[label_column].to_numpy().astype(np.int64)
    unknown = sorted(set(np.unique(labels).tolist()) - set(task.label.values))
    if unknown:
        raise ValueError(f"corpus labels {unknown} are not values of the task's label {task.label.values}")
    return table[text_column].combine_chunks().cast(pa.string()), labels


def _fault_plan(rng: np.random.Generator, n: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Which lines of a day are written malformed (see ``_DrawnDay``), and which line a repeat repeats."""
    line_kind = np.zeros(n, np.int8)
    duplicate_of = np.full(n, -1, np.int64)
    bad = min(rng.binomial(n, rate), n // 2)
    if not bad:
        return line_kind, duplicate_of
    positions = rng.choice(n, size=bad, replace=False)
    line_kind[positions] = 1 + rng.choice(len(MALFORMED_KINDS), size=bad, p=MALFORMED_WEIGHTS)
    repeats = positions[line_kind[positions] == 1 + MALFORMED_KINDS.index("duplicate_request_id")]
    valid = np.flatnonzero(line_kind == 0)
    duplicate_of[repeats] = valid[rng.integers(len(valid), size=len(repeats))]
    return line_kind, duplicate_of


def _render_lines(con: duckdb.DuckDBPyConnection, rows: pa.Table, task: Task) -> pa.Array:
    """The JSON line of every row, as UTF-8 bytes (malformed ones are rewritten afterwards)."""
    con.register("simulated", rows)
    try:
        # The table's columns carry the log fields' names; the two constants are written inline.
        expressions = {spec.name: spec.name for spec in SCHEMA_FIELDS if spec.name in rows.column_names}
        expressions["schema_version"] = str(SCHEMA_VERSION)
        expressions["task"] = "'" + task.id.replace("'", "''") + "'"
        line = log_line_sql(expressions)
        rendered = con.sql(f"SELECT {line} || chr(10) FROM simulated").to_arrow_table().column(0)
    finally:
        con.unregister("simulated")
    # Binary, because an invalid_utf8 line cannot live in an Arrow string array; with 64-bit
    # offsets, because a busy day's lines pass the 2 GiB that 32-bit ones can address.
    return rendered.cast(pa.large_binary()).combine_chunks()


def _with_faults(lines: pa.Array, drawn: _DrawnDay) -> pa.Array:
    """``lines`` with the planned malformed lines written in (Python touches only those)."""
    rng = drawn.rng
    positions = np.flatnonzero(drawn.line_kind)
    replacements = []
    for position in positions.tolist():
        kind = MALFORMED_KINDS[drawn.line_kind[position] - 1]
        line = lines[position].as_py().decode("utf-8")
        if kind == "truncated_json":
            # A writer killed mid-line; any proper prefix of an object is invalid JSON.
            line = line[: int(rng.integers(len(line) // 4, len(line) - 1))]
        elif kind == "not_json":
            line = NOT_JSON_LINES[int(rng.integers(len(NOT_JSON_LINES)))]
        elif kind == "missing_required_field":
            record = json.loads(line)
            del record[REQUIRED_FIELDS_TO_DROP[int(rng.integers(len(REQUIRED_FIELDS_TO_DROP)))]]
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        elif kind == "wrong_type":
            record = json.loads(line)
            name, wrong = WRONG_TYPES[int(rng.integers(len(WRONG_TYPES)))]
            record[name] = wrong
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        elif kind == "duplicate_request_id":
            # A client retry that wrote an already written record again.
            line = lines[int(drawn.duplicate_of[position])].as_py().decode("utf-8")
        elif kind == "invalid_utf8":
            # Lone surrogates become the raw bytes 0xff 0xfe under the surrogateescape encoding.
            line = line.replace('"input":"', '"input":"\udcff\udcfe', 1)
        replacements.append(line.rstrip("\n").encode("utf-8", "surrogateescape") + b"\n")
    return _replace_rows(lines, drawn.line_kind > 0, pa.array(replacements, pa.large_binary()))


def _batch_sizes(n: int, mean: int, rng: np.random.Generator) -> list[int]:
    """Object sizes of a client that flushes every ``mean`` records, give or take half."""
    sizes, left = [], n
    while left > 0:
        size = min(left, int(rng.integers(max(1, mean // 2), mean + mean // 2 + 1)))
        sizes.append(size)
        left -= size
    return sizes
