"""The teacher request/response log format: one JSON object per line, versioned.

This module is the single definition of the schema. The logging client writes it, the importer
and the simulator produce it, and ingestion validates it (``SCHEMA_FIELDS`` drives the SQL
validation in :mod:`distill_pipeline.data.ingest`). The README documents the same fields.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 2
#: Version 2 adds the optional serving fields (who answered, the student's answer, the rollout)
#: and the teacher's label distribution; a version 1 record is a version 2 record without them.
SUPPORTED_SCHEMA_VERSIONS = (1, 2)

#: Who answered the caller (``served_by``): the teacher, or the student the pipeline trained.
SERVED_BY = ("teacher", "student")
#: How a deployment splits its traffic (``rollout``): the student shadows every call (dark), answers
#: when it is confident (hybrid), answers a sticky share of users (canary), or answers all (full).
ROLLOUT_MODES = ("dark", "hybrid", "canary", "full")
#: The part each model played in a call (``call_kind``):
#: - ``teacher``: the teacher alone answered (no student ran);
#: - ``shadow``: the teacher answered the caller, the student answered unseen beside it;
#: - ``deferred``: the student ran, was unsure, and the teacher answered the caller;
#: - ``student``: the student alone answered (the teacher was not asked);
#: - ``sample``: the student answered the caller, and the teacher was asked too, for evaluation;
#: - ``fallback``: the teacher was to answer, failed, and the student's answer was returned.
#: Only ``shadow`` and ``sample`` pairs are an unbiased sample of traffic for live agreement
#: (``deferred`` pairs are the ones the student was unsure of).
CALL_KINDS = ("teacher", "shadow", "deferred", "student", "sample", "fallback")

#: Where log objects live inside a store: ``logs/dt=YYYY-MM-DD/<object>.jsonl``.
LOG_PREFIX = "logs"
#: What ingestion reads under a day's prefix; anything else (a temporary upload, a README) is ignored.
LOG_SUFFIXES = (".jsonl", ".jsonl.gz")

#: Longest request id accepted; longer ones are quarantined.
MAX_REQUEST_ID_CHARS = 256


@dataclass(frozen=True)
class FieldSpec:
    """One top-level field of a log record and the JSON type it must have."""

    name: str
    json_type: str  # "string", "integer", "number", "object"
    required: bool
    doc: str


SCHEMA_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("schema_version", "integer", True, "Version of this schema: 2 (1 is still read)."),
    FieldSpec("request_id", "string", True, "Unique id of the call; the idempotency key."),
    FieldSpec("timestamp", "string", True, "When the call was made, RFC 3339 / ISO 8601, UTC."),
    FieldSpec("user_id", "string", True, "The calling end user (used for power-user caps)."),
    FieldSpec("tenant_id", "string", False, "The calling tenant or application, if any."),
    FieldSpec("task", "string", False, "Task id, e.g. 'toxicity'."),
    FieldSpec("model", "string", True, "Teacher model, as a litellm model string."),
    FieldSpec("params", "object", False, "Sampling parameters (temperature, max_tokens, ...)."),
    FieldSpec("prompt_template_id", "string", True, "Prompt template id, e.g. 'simple_prompt'."),
    FieldSpec("prompt_template_version", "string", False, "Prompt template version."),
    FieldSpec("input", "string", True, "The task input (the text to classify)."),
    FieldSpec("response", "string", False, "Raw response text; null when the call failed."),
    FieldSpec("usage", "object", False, "Token usage: prompt_tokens, completion_tokens, ..."),
    FieldSpec("latency_ms", "number", False, "Wall time of the call in milliseconds."),
    FieldSpec("cost_usd", "number", False, "Cost of the call in US dollars."),
    FieldSpec("error", "string", False, "Provider error message; null on success."),
    FieldSpec("feedback", "object", False, "End-user feedback, e.g. {'thumbs': 'up'}."),
    FieldSpec("served_by", "string", False, "Who answered the caller: 'teacher' (absent: teacher) or 'student'."),
    FieldSpec("rollout", "string", False, "The serving deployment's mode: 'dark', 'hybrid', 'canary' or 'full'."),
    FieldSpec(
        "call_kind",
        "string",
        False,
        "The part each model played: 'teacher', 'shadow', 'deferred', 'student', 'sample' or 'fallback'.",
    ),
    FieldSpec(
        "student",
        "object",
        False,
        "The student's answer when it ran: train_id, label, confidence (its probability), latency_ms.",
    ),
    FieldSpec(
        "label_distribution",
        "object",
        False,
        "The teacher's probability per label value, e.g. {'0': 0.2, '1': 0.8} (logprobs or samples).",
    ),
)


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class LogRecord:
    """One teacher call as an application logs it."""

    input: str
    model: str
    prompt_template_id: str
    response: str | None
    user_id: str = "anonymous"
    request_id: str = field(default_factory=new_request_id)
    timestamp: str = field(default_factory=utc_now_iso)
    tenant_id: str | None = None
    task: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    prompt_template_version: str | None = None
    usage: dict[str, Any] | None = None
    latency_ms: float | None = None
    cost_usd: float | None = None
    error: str | None = None
    feedback: dict[str, Any] | None = None
    served_by: str | None = None
    rollout: str | None = None
    call_kind: str | None = None
    student: dict[str, Any] | None = None
    label_distribution: dict[str, float] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @property
    def day(self) -> str:
        return day_of(self.timestamp)


#: End-user feedback that arrives after the call (thumbs up or down, a regenerate) is appended to
#: its own stream, ``feedback/dt=YYYY-MM-DD/<object>.jsonl``, one ``FeedbackEvent`` per line, and
#: joined to the call by request id: a log record, once written, is never rewritten.
FEEDBACK_PREFIX = "feedback"
FEEDBACK_SCHEMA_VERSION = 1
#: What a feedback event may say: ``{"thumbs": "up" | "down"}`` or ``{"regenerate": true}``.
FEEDBACK_THUMBS = ("up", "down")


@dataclass
class FeedbackEvent:
    """The end user's verdict on one earlier call, keyed by its request id."""

    request_id: str
    feedback: dict[str, Any]
    user_id: str | None = None
    timestamp: str = field(default_factory=utc_now_iso)
    schema_version: int = FEEDBACK_SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems = feedback_problems(self.request_id, self.feedback)
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @property
    def day(self) -> str:
        return day_of(self.timestamp)


def feedback_problems(request_id: object, feedback: object) -> list[str]:
    """What is wrong with a feedback event's request id and verdict; empty when it is valid."""
    problems = []
    if not isinstance(request_id, str) or not request_id.strip() or len(request_id) > MAX_REQUEST_ID_CHARS:
        problems.append(f"request_id must be a non-empty string of at most {MAX_REQUEST_ID_CHARS} characters")
    if not isinstance(feedback, dict) or not feedback:
        problems.append('feedback must be {"thumbs": "up"|"down"} or {"regenerate": true}')
    else:
        unknown = sorted(set(feedback) - {"thumbs", "regenerate"})
        if unknown:
            problems.append(f"unknown feedback keys {unknown}; known: thumbs, regenerate")
        if "thumbs" in feedback and feedback["thumbs"] not in FEEDBACK_THUMBS:
            problems.append(f"thumbs must be one of {', '.join(FEEDBACK_THUMBS)}")
        if "regenerate" in feedback and feedback["regenerate"] is not True:
            problems.append("regenerate must be true")
    return problems


def feedback_object_key(day: str, name: str) -> str:
    """Key of a feedback object; ``name`` should be unique per writer and batch."""
    return f"{FEEDBACK_PREFIX}/dt={day}/{name}.jsonl"


def day_of(timestamp: str) -> str:
    """The UTC day (``YYYY-MM-DD``) of an ISO timestamp."""
    parsed = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC)
    return parsed.date().isoformat()


def log_object_prefix(day: str) -> str:
    return f"{LOG_PREFIX}/dt={day}/"


def log_object_key(day: str, name: str) -> str:
    """Key of a log object; ``name`` should be unique per writer and batch."""
    return f"{log_object_prefix(day)}{name}.jsonl"


def encode_log_object(lines: list[str]) -> bytes:
    """The bytes of a log object: one JSON record per line, UTF-8, newline-terminated."""
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
