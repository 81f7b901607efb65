"""Tasks as configuration: a task's label set, prompt templates, curation, splits and student.

A task is a folder with a ``task.toml`` and its prompt files. The built-in tasks live in
``distill_pipeline/core/tasks/<id>/``; ``DISTILL_TASK`` may name a built-in id or a path to another
folder, so a new task needs no change to the pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
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
    # Live agreement on served traffic (shadow and sample pairs): a drift signal when the top of its
    # 95% interval lies more than this margin below the champion's test-set agreement; days with
    # fewer pairs are reported but not judged.
    live_agreement_margin: float = 0.05
    min_live_pairs: int = 30
    # The feedback stream is read this many days past the calls' day, for verdicts that come late.
    feedback_lag_days: int = 7
    # The share of positives traffic has, where it is known (e.g. 0.09); None: the share in the
    # logged traffic the frozen test sets were drawn from. Evaluation also scores every model at
    # this share (students/traffic.py); the drift report shows the share traffic has day by day.
    deployment_prior: float | None = None

    def __post_init__(self) -> None:
        if min(self.sample_rows, self.embedding_rows, self.permutations, self.shadow_rows, self.min_rows) < 1:
            raise TaskConfigError("monitoring row counts and permutations must be positive")
        if not 0.0 <= self.live_agreement_margin < 1.0 or self.min_live_pairs < 1 or self.feedback_lag_days < 0:
            raise TaskConfigError(
                "monitoring.live_agreement_margin must be within [0, 1), min_live_pairs positive and "
                "feedback_lag_days not negative"
            )
        if self.sensor_interval_s < 1 or self.fresh_log_days < 1:
            raise TaskConfigError("monitoring.sensor_interval_s and monitoring.fresh_log_days must be positive")
        if self.deployment_prior is not None and (
            isinstance(self.deployment_prior, bool)
            or not isinstance(self.deployment_prior, int | float)
            or not 0.0 < self.deployment_prior < 1.0
        ):
            raise TaskConfigError(
                f"monitoring.deployment_prior is a share strictly between 0 and 1, not {self.deployment_prior!r}"
            )


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


#: The variant every task has: the [student] table itself, with no overrides.
BASE_VARIANT = "base"
# A variant name is a partition key, a metadata key and a store path segment.
VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass(frozen=True)
class Variant:
    """A named student experiment: the base student with a few settings overridden."""

    name: str
    description: str
    # The StudentSettings fields this variant sets, as the task file writes them.
    overrides: dict[str, Any]
    settings: StudentSettings

    def change(self) -> str:
        """What the variant changes from base, in one line (``lora_r=16, lora_alpha=32``)."""
        return ", ".join(f"{name}={value!r}" for name, value in self.overrides.items()) or "nothing (the base student)"


@dataclass(frozen=True)
class PromotionConfig:
    """How sure a decision must be: the champion gate and the choice among sizes and variants.

    A challenger is promoted only when a paired test on the same test rows (McNemar's exact test
    for accuracy, the paired bootstrap otherwise) finds it better than the reference at ``alpha``
    on every ``decisive`` test set, and finds it significantly worse on none.
    """

    alpha: float = 0.05
    decisive: tuple[str, ...] = ("in_distribution",)
    # Bootstrap resamples behind every interval and paired bootstrap; seeded, so reruns agree.
    resamples: int = 4000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise TaskConfigError(f"promotion.alpha must be between 0 and 0.5, not {self.alpha!r}")
        if not self.decisive:
            raise TaskConfigError("promotion.decisive must name at least one test set")
        if not 100 <= self.resamples <= 100_000:
            raise TaskConfigError(f"promotion.resamples must be between 100 and 100000, not {self.resamples!r}")


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
    # Every student variant by name, base first; empty means base alone (see ``variant``).
    variants: dict[str, Variant] = field(default_factory=dict)
    # The variants the demo's main job trains; the rest are launched from the UI.
    demo_variants: tuple[str, ...] = (BASE_VARIANT,)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)

    def __post_init__(self) -> None:
        if BASE_VARIANT not in self.variants:
            base = Variant(BASE_VARIANT, "the [student] table", {}, self.student)
            object.__setattr__(self, "variants", {BASE_VARIANT: base, **self.variants})

    def variant(self, name: str) -> Variant:
        try:
            return self.variants[name]
        except KeyError:
            raise KeyError(f"task {self.id!r} has no student variant {name!r}; known: {list(self.variants)}") from None

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


def _student_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A table of StudentSettings fields by name (or an old alias), its keys checked."""
    settings = dict(raw)
    for alias, name in STUDENT_KEY_ALIASES.items():
        if alias in settings:
            if name in settings:
                raise TaskConfigError(f"{where} sets both {name!r} and its old name {alias!r}; keep {name!r}")
            settings[name] = settings.pop(alias)
    known = {f.name for f in fields(StudentSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TaskConfigError(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; the keys are StudentSettings' fields "
            f"(distill_pipeline/trainer/spec.py): {', '.join(sorted(known))}"
        )
    return settings


def _student_settings(raw: dict[str, Any]) -> StudentSettings:
    """The [student] table as StudentSettings: its keys are the field names (or an old alias)."""
    try:
        return StudentSettings(**_student_fields(raw, "[student]"))
    except (ValueError, TypeError) as exc:
        raise TaskConfigError(f"[student]: {exc}") from None


#: Keys of the [variants] table that are not variants.
VARIANTS_DEMO_KEY = "demo"


def _variants(raw: Any, base: StudentSettings) -> tuple[dict[str, Variant], tuple[str, ...]]:
    """The [variants] table: ``demo`` (the variants the main job trains) and one sub-table per variant.

    A variant's keys are ``description`` and any StudentSettings field, checked exactly as the
    [student] table's are; the field values replace base's and the result is validated whole.
    """
    if not isinstance(raw, dict):
        raise TaskConfigError("[variants] must be a table of variant tables")
    table = dict(raw)
    demo = table.pop(VARIANTS_DEMO_KEY, [BASE_VARIANT])
    variants: dict[str, Variant] = {BASE_VARIANT: Variant(BASE_VARIANT, "the [student] table", {}, base)}
    seen: dict[tuple[tuple[str, str], ...], str] = {}
    for name, entry in table.items():
        where = f"[variants.{name}]"
        if name == BASE_VARIANT:
            raise TaskConfigError(f"{where}: the base variant is the [student] table itself; set its fields there")
        if not VARIANT_NAME.match(name):
            raise TaskConfigError(
                f"{where}: a variant name is 1-40 lower-case letters, digits and underscores, starting with a letter"
            )
        if not isinstance(entry, dict):
            raise TaskConfigError(f"{where} must be a table of StudentSettings fields, not {type(entry).__name__}")
        entry = dict(entry)
        description = entry.pop("description", "")
        if not isinstance(description, str):
            raise TaskConfigError(f"{where}: description must be a string")
        overrides = _student_fields(entry, where)
        changed = {key: value for key, value in overrides.items() if getattr(base, key) != value}
        if not changed:
            raise TaskConfigError(f"{where} changes nothing from the [student] table: give it a field to change")
        try:
            settings = dataclasses.replace(base, **overrides)
        except (ValueError, TypeError) as exc:
            raise TaskConfigError(f"{where}: {exc}") from None
        fingerprint = tuple(sorted((key, repr(getattr(settings, key))) for key in overrides))
        if fingerprint in seen:
            raise TaskConfigError(f"{where} trains the same student as [variants.{seen[fingerprint]}]")
        seen[fingerprint] = name
        variants[name] = Variant(name, description, changed, settings)
    if not isinstance(demo, list) or not demo or not all(isinstance(v, str) for v in demo):
        raise TaskConfigError("[variants] demo must be a non-empty list of variant names")
    unknown = [v for v in demo if v not in variants]
    if unknown:
        raise TaskConfigError(f"[variants] demo names unknown variant(s) {unknown}; known: {list(variants)}")
    return variants, tuple(dict.fromkeys(demo))


def _promotion(raw: Any) -> PromotionConfig:
    if not isinstance(raw, dict):
        raise TaskConfigError("[promotion] must be a table")
    settings = dict(raw)
    if "decisive" in settings:
        decisive = settings["decisive"]
        if not isinstance(decisive, list) or not all(isinstance(name, str) for name in decisive):
            raise TaskConfigError("promotion.decisive must be a list of test-set names")
        settings["decisive"] = tuple(decisive)
    for name, number in (("alpha", "a number"), ("resamples", "an integer"), ("seed", "an integer")):
        value = settings.get(name, 0)
        allowed = (int, float) if name == "alpha" else (int,)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise TaskConfigError(f"promotion.{name} must be {number}, not {value!r}")
    return PromotionConfig(**settings)


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
        student = _student_settings(raw.get("student", {}))
        variants, demo_variants = _variants(raw.get("variants", {}), student)
        return Task(
            id=raw["id"],
            description=raw.get("description", ""),
            label=_label_spec(raw["label"]),
            prompts=prompts,
            curation=CurationConfig(**raw.get("curation", {})),
            splits=SplitConfig(**splits),
            checks=CheckConfig(**raw.get("checks", {})),
            source=folder,
            student=student,
            synthetic=SyntheticConfig(**synthetic),
            monitoring=MonitoringConfig(**raw.get("monitoring", {})),
            variants=variants,
            demo_variants=demo_variants,
            promotion=_promotion(raw.get("promotion", {})),
        )
    except (KeyError, TypeError) as exc:
        raise TaskConfigError(f"task {name!r}: {exc}") from exc
