"""Tasks as configuration: a task's label set, prompt templates, curation, splits and student.

A task is a folder with a ``task.toml`` and its prompt files. The built-in tasks live in
``distill_pipeline/core/tasks/<id>/``; ``DISTILL_TASK`` may name a built-in id or a path to another
folder, so a new task needs no change to the pipeline.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from distill_pipeline.trainer.spec import StudentSettings

BUILTIN_TASKS_DIR = Path(__file__).parent.parent / "tasks"
DEFAULT_TASK = "toxicity"


@dataclass(frozen=True)
class LabelSpec:
    field: str
    values: tuple[int, ...]
    names: tuple[str, ...]
    positive: int | None
    # normalised plain-text answer -> label value
    aliases: dict[str, int]

    def name_of(self, value: int) -> str:
        return self.names[self.values.index(value)]


@dataclass(frozen=True)
class PromptTemplate:
    id: str
    version: str
    text: str
    placeholder: str = "%s"
    description: str = ""

    def render(self, task_input: str) -> str:
        return self.text.replace(self.placeholder, task_input, 1)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class CurationConfig:
    min_chars: int = 1
    max_chars: int = 20_000
    drop_patterns: dict[str, str] = field(default_factory=dict)
    max_examples_per_user: int | None = None
    near_duplicate_threshold: float | None = 0.8
    scrub_pii: bool = False
    balance_labels: bool = False


@dataclass(frozen=True)
class SplitConfig:
    in_distribution_test_size: int = 500
    balanced_test_size: int = 200
    train_sizes: tuple[str, ...] = ("5%", "10%", "25%", "50%", "75%", "100%")
    seed: int = 17


@dataclass(frozen=True)
class CheckConfig:
    max_parse_failure_rate: float = 0.05
    # Share of the rows handed to teachers (relabel, fill) that no teacher answered: provider
    # errors after the retries and the fallback.
    max_teacher_failure_rate: float = 0.05
    max_quarantine_rate: float = 0.05
    # A log object holding more bytes than this, as stored or once gunzipped, is quarantined
    # whole and the rest of its day ingests: a small gzip bomb never expands past it.
    max_log_object_bytes: int = 256 * 2**20
    min_curated_rows: int = 100
    min_positive_rate: float = 0.02
    max_positive_rate: float = 0.98


@dataclass(frozen=True)
class MonitoringConfig:
    """Keeping the student current: how often it is re-distilled and when drift calls for retraining.

    The drift thresholds compare a day of fresh traffic with the champion's training data; see
    ``distill_pipeline/monitoring/drift.py`` for what each statistic means.
    """

    # The re-distillation schedule (cron, UTC) and the training-set size it retrains.
    retrain_cron: str = "0 3 * * 0"
    retrain_size: str = "100%"
    # How often the fresh-logs, automation and retraining sensors look (seconds).
    sensor_interval_s: int = 60
    # The fresh-logs sensor looks at this many most recent days per tick (today included), so a
    # tick costs the same however long the bucket's history; objects written for older days are
    # ingested by launching that day's partition from the UI.
    fresh_log_days: int = 7
    # Rows sampled from each side for the drift statistics; bounds their cost on a CPU.
    sample_rows: int = 400
    embedding_rows: int = 200
    permutations: int = 300
    # Days with fewer labelled rows than this are reported but never raise a drift signal.
    min_rows: int = 50
    max_length_psi: float = 0.25
    max_oov_increase: float = 0.10
    # Embedding drift fires when the MMD is significant and at least this large.
    embedding_alpha: float = 0.01
    min_embedding_mmd: float = 0.01
    max_label_rate_shift: float = 0.10
    # Shadow evaluation: the champion's agreement with the teacher on fresh traffic may fall at
    # most this far below its agreement on the in-distribution test set.
    max_agreement_drop: float = 0.08
    shadow_rows: int = 300

    def __post_init__(self) -> None:
        if min(self.sample_rows, self.embedding_rows, self.permutations, self.shadow_rows, self.min_rows) < 1:
            raise TaskConfigError("monitoring row counts and permutations must be positive")
        if self.sensor_interval_s < 1 or self.fresh_log_days < 1:
            raise TaskConfigError("monitoring.sensor_interval_s and monitoring.fresh_log_days must be positive")


@dataclass(frozen=True)
class SyntheticConfig:
    """Self-Instruct style bootstrap: a teacher rewrites seed inputs, each rewrite is then labelled.

    ``prompt`` asks for one rewrite of an input (its placeholder) in one of ``variations`` (the
    text ``{variation}`` in the prompt marks where). A rewrite whose word set is at least
    ``max_similarity`` (Jaccard) like its seed or another rewrite of that seed is dropped.
    """

    prompt: PromptTemplate | None = None
    variations: tuple[str, ...] = ()
    rewrites_per_seed: int = 3
    max_similarity: float = 0.6
    temperature: float = 0.9
    max_tokens: int = 400


@dataclass(frozen=True)
class Task:
    id: str
    description: str
    label: LabelSpec
    prompts: dict[str, PromptTemplate]
    curation: CurationConfig
    splits: SplitConfig
    checks: CheckConfig
    source: Path
    # The [student] table: any StudentSettings field, by its name (the trainer's defaults).
    student: StudentSettings = field(default_factory=StudentSettings)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)

    def prompt(self, prompt_id: str) -> PromptTemplate:
        try:
            return self.prompts[prompt_id]
        except KeyError:
            raise KeyError(f"task {self.id!r} has no prompt {prompt_id!r}; known: {sorted(self.prompts)}") from None


class TaskConfigError(ValueError):
    """A task file is missing something or contradicts itself."""


def _label_spec(raw: dict[str, Any]) -> LabelSpec:
    values = tuple(int(v) for v in raw["values"])
    names = tuple(str(n) for n in raw.get("names", [str(v) for v in values]))
    if len(names) != len(values):
        raise TaskConfigError("label.names must have one name per label value")
    aliases: dict[str, int] = {}
    for value, words in raw.get("aliases", {}).items():
        if int(value) not in values:
            raise TaskConfigError(f"label alias for unknown value {value!r}")
        for word in words:
            aliases[str(word).strip().lower()] = int(value)
    for value, name in zip(values, names, strict=True):
        aliases.setdefault(str(value), value)
        aliases.setdefault(name.lower(), value)
    positive = raw.get("positive")
    if positive is not None and int(positive) not in values:
        raise TaskConfigError("label.positive must be one of label.values")
    return LabelSpec(str(raw["field"]), values, names, None if positive is None else int(positive), aliases)


#: Old [student] keys still accepted, and the StudentSettings field each one sets.
STUDENT_KEY_ALIASES = {"kind": "student_kind"}


def _student_settings(raw: dict[str, Any]) -> StudentSettings:
    """The [student] table as StudentSettings: its keys are the field names (or an old alias)."""
    settings = dict(raw)
    for alias, name in STUDENT_KEY_ALIASES.items():
        if alias in settings:
            if name in settings:
                raise TaskConfigError(f"[student] sets both {name!r} and its old name {alias!r}; keep {name!r}")
            settings[name] = settings.pop(alias)
    known = {f.name for f in fields(StudentSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TaskConfigError(
            f"[student] has unknown key(s) {', '.join(map(repr, unknown))}; the keys are StudentSettings' fields "
            f"(distill_pipeline/trainer/spec.py): {', '.join(sorted(known))}"
        )
    try:
        return StudentSettings(**settings)
    except ValueError as exc:
        raise TaskConfigError(f"[student]: {exc}") from None


def load_task(name_or_path: str | os.PathLike[str] | None = None) -> Task:
    """Load a task by built-in id or folder path (default: ``$DISTILL_TASK`` or toxicity)."""
    name = str(name_or_path or os.environ.get("DISTILL_TASK") or DEFAULT_TASK)
    folder = Path(name)
    if not (folder / "task.toml").is_file():
        folder = BUILTIN_TASKS_DIR / name
    if not (folder / "task.toml").is_file():
        raise TaskConfigError(f"no task.toml for task {name!r} (looked in {folder})")
    raw = tomllib.loads((folder / "task.toml").read_text())
    try:
        prompts = {}
        for entry in raw.get("prompts", []):
            text = (folder / entry["file"]).read_text()
            placeholder = entry.get("placeholder", "%s")
            if placeholder not in text:
                raise TaskConfigError(f"prompt {entry['id']!r} lacks its placeholder {placeholder!r}")
            prompts[entry["id"]] = PromptTemplate(
                entry["id"], str(entry.get("version", "1")), text, placeholder, entry.get("description", "")
            )
        splits = dict(raw.get("splits", {}))
        if "train_sizes" in splits:
            splits["train_sizes"] = tuple(str(s) for s in splits["train_sizes"])
        synthetic = dict(raw.get("synthetic", {}))
        if "prompt" in synthetic:
            entry = synthetic.pop("prompt")
            text = (folder / entry["file"]).read_text()
            placeholder = entry.get("placeholder", "%s")
            if placeholder not in text or "{variation}" not in text:
                raise TaskConfigError(f"synthetic prompt lacks its placeholder {placeholder!r} or {{variation}}")
            synthetic["prompt"] = PromptTemplate(
                entry.get("id", "rewrite_prompt"), str(entry.get("version", "1")), text, placeholder
            )
        if "variations" in synthetic:
            synthetic["variations"] = tuple(str(v) for v in synthetic["variations"])
        return Task(
            id=raw["id"],
            description=raw.get("description", ""),
            label=_label_spec(raw["label"]),
            prompts=prompts,
            curation=CurationConfig(**raw.get("curation", {})),
            splits=SplitConfig(**splits),
            checks=CheckConfig(**raw.get("checks", {})),
            source=folder,
            student=_student_settings(raw.get("student", {})),
            synthetic=SyntheticConfig(**synthetic),
            monitoring=MonitoringConfig(**raw.get("monitoring", {})),
        )
    except (KeyError, TypeError) as exc:
        raise TaskConfigError(f"task {name!r}: {exc}") from exc
