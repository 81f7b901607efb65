"""Drift of fresh traffic against what the champion was trained on, and when it calls for retraining.

Each statistic compares a day's logged inputs (or the teacher's labels of them) with a reference
sample, the champion's training set:

- **length**: the population stability index (PSI) of input lengths over the reference's deciles,
  with the two-sample Kolmogorov-Smirnov statistic and p-value beside it. PSI is the signal
  because, unlike a p-value, it does not turn every tiny shift significant on a busy day.
- **out-of-vocabulary rate**: the share of the day's word tokens not in a vocabulary built from
  half of the reference, minus the same rate of the other half (what a fresh sample of the same
  traffic scores). A new topic or language shows up here first.
- **embedding**: the squared maximum mean discrepancy (MMD, RBF kernel at the median distance)
  between mean-pooled sentence embeddings of both samples, with a permutation p-value. One frozen
  encoder (the packaged all-MiniLM-L6-v2 by default) embeds every day, so the numbers stay
  comparable across champions.
- **label rate**: the teacher's positive-label rate on the day against the reference's.
- **shadow agreement**: the champion labels the day's inputs (a dark launch: nobody sees its
  answers) and its agreement with the teacher's logged answers is compared with its agreement on
  the frozen in-distribution test set.
- **live agreement**: on served traffic (``live.py``), the served champion's own answers against
  the teacher's labels on shadow and sample pairs, with a Wilson interval; it signals when the
  whole interval lies more than ``live_agreement_margin`` below the test-set agreement, so a
  small day's noise never triggers retraining. Where the day has enough such pairs, it replaces
  the shadow evaluation (the same question, answered by the student that served).

Input statistics use every call of the day (the student-served ones too: inputs need no teacher);
the label rate uses the teacher's labels of calls it answered for a reason unrelated to the input.

Samples are bounded (``MonitoringConfig``), so a report costs seconds on a CPU whatever the
day's volume. Nothing here imports Dagster; torch and transformers load only to embed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from distill_pipeline.core.normalise import normalised_text
from distill_pipeline.core.task import MonitoringConfig
from distill_pipeline.monitoring.feedback import FeedbackRates
from distill_pipeline.monitoring.live import LiveReport

# PSI bins: the reference's deciles; empty bins get this share so the log stays finite.
PSI_BINS = 10
PSI_FLOOR = 1e-4
EMBEDDING_MAX_LENGTH = 128

LENGTH_PSI = "length_psi"
OOV_INCREASE = "oov_rate_increase"
EMBEDDING_MMD = "embedding_mmd"
LABEL_RATE_SHIFT = "label_rate_shift"
AGREEMENT_DROP = "shadow_agreement_drop"
LIVE_AGREEMENT_DROP = "live_agreement_drop"
SIGNALS = (LENGTH_PSI, OOV_INCREASE, EMBEDDING_MMD, LABEL_RATE_SHIFT, AGREEMENT_DROP, LIVE_AGREEMENT_DROP)


def seeded_sample(values: Sequence[Any], n: int, seed: int) -> list[Any]:
    """At most ``n`` values, drawn without replacement by a generator seeded with ``seed``."""
    if len(values) <= n:
        return list(values)
    picked = np.random.default_rng(seed).choice(len(values), size=n, replace=False)
    return [values[i] for i in sorted(picked.tolist())]


# --- input length ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthDrift:
    psi: float
    ks_statistic: float
    ks_p_value: float
    reference_median: float
    current_median: float


def population_stability_index(reference: Sequence[float], current: Sequence[float], bins: int = PSI_BINS) -> float:
    """PSI of ``current`` against ``reference`` over the reference's quantile bins.

    Conventionally below 0.1 is stable, 0.1-0.25 a moderate shift and above 0.25 a major one.
    """
    ref, cur = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if not len(ref) or not len(cur):
        raise ValueError("both samples need values")
    # Inner edges only: the outer bins catch everything beyond the reference's range.
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_share = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    cur_share = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
    ref_share, cur_share = np.maximum(ref_share, PSI_FLOOR), np.maximum(cur_share, PSI_FLOOR)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def length_drift(reference_texts: Sequence[str], current_texts: Sequence[str]) -> LengthDrift:
    from scipy.stats import ks_2samp

    ref = np.array([len(t) for t in reference_texts], dtype=float)
    cur = np.array([len(t) for t in current_texts], dtype=float)
    ks = ks_2samp(ref, cur)
    return LengthDrift(
        psi=population_stability_index(ref, cur),
        ks_statistic=float(ks.statistic),
        ks_p_value=float(ks.pvalue),
        reference_median=float(np.median(ref)),
        current_median=float(np.median(cur)),
    )


# --- vocabulary --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabularyDrift:
    oov_rate: float
    reference_oov_rate: float
    increase: float
    vocabulary_size: int
    top_new_words: list[str]


def words(text: str) -> list[str]:
    """The words of ``text`` by the project's one rule (``core.normalise``), as curation splits them."""
    return normalised_text(text).split()


def _oov(texts: Iterable[str], vocabulary: set[str]) -> tuple[float, dict[str, int]]:
    total, unknown = 0, {}
    for text in texts:
        for word in words(text):
            total += 1
            if word not in vocabulary:
                unknown[word] = unknown.get(word, 0) + 1
    return (sum(unknown.values()) / total if total else 0.0), unknown


def vocabulary_drift(reference_texts: Sequence[str], current_texts: Sequence[str], top: int = 10) -> VocabularyDrift:
    """OOV rate of the day against half the reference, less that of the reference's other half."""
    if len(reference_texts) < 2:
        raise ValueError("the reference needs at least two texts")
    vocabulary = {w for text in reference_texts[0::2] for w in words(text)}
    baseline, _ = _oov(reference_texts[1::2], vocabulary)
    rate, unknown = _oov(current_texts, vocabulary)
    new_words = [w for w, _ in sorted(unknown.items(), key=lambda item: (-item[1], item[0]))[:top]]
    return VocabularyDrift(rate, baseline, rate - baseline, len(vocabulary), new_words)


# --- embeddings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingDrift:
    mmd2: float
    p_value: float
    permutations: int
    rows: tuple[int, int]


def _squared_distances(z: np.ndarray) -> np.ndarray:
    norms = np.sum(z * z, axis=1)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * z @ z.T, 0.0)


def _mmd2_unbiased(kernel: np.ndarray, in_x: np.ndarray) -> float:
    x, y = in_x, ~in_x
    m, n = int(x.sum()), int(y.sum())
    kxx, kyy, kxy = kernel[np.ix_(x, x)], kernel[np.ix_(y, y)], kernel[np.ix_(x, y)]
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, *, permutations: int, seed: int) -> EmbeddingDrift:
    """Unbiased MMD² between two samples (RBF kernel, median-distance bandwidth) and its p-value.

    The p-value counts permuted splits of the pooled sample whose MMD² reaches the observed one,
    with the +1 correction so it is never zero.
    """
    if len(x) < 2 or len(y) < 2:
        raise ValueError("each sample needs at least two rows")
    pooled = np.concatenate([np.asarray(x, float), np.asarray(y, float)])
    distances = _squared_distances(pooled)
    off_diagonal = distances[~np.eye(len(pooled), dtype=bool)]
    bandwidth = float(np.median(off_diagonal)) or 1.0
    kernel = np.exp(-distances / bandwidth)
    in_x = np.zeros(len(pooled), dtype=bool)
    in_x[: len(x)] = True
    observed = _mmd2_unbiased(kernel, in_x)
    rng = np.random.default_rng(seed)
    reached = sum(_mmd2_unbiased(kernel, rng.permutation(in_x)) >= observed for _ in range(permutations))
    return EmbeddingDrift(observed, (reached + 1) / (permutations + 1), permutations, (len(x), len(y)))


def embed_texts(texts: Sequence[str], model_path: str | None = None, *, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings from a frozen encoder (packaged MiniLM by default)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from distill_pipeline.trainer.model import resolve_base_model

    path = resolve_base_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=EMBEDDING_MAX_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0))


# --- labels and the shadow champion ---------------------------------------------------------------------


@dataclass(frozen=True)
class LabelRateDrift:
    reference_rate: float
    current_rate: float
    shift: float


def label_rate_drift(reference_labels: Sequence[int], current_labels: Sequence[int], positive: int) -> LabelRateDrift:
    if not reference_labels or not current_labels:
        raise ValueError("both samples need labels")
    ref = float(np.mean(np.asarray(reference_labels) == positive))
    cur = float(np.mean(np.asarray(current_labels) == positive))
    return LabelRateDrift(ref, cur, abs(cur - ref))


@dataclass(frozen=True)
class ShadowEvaluation:
    """The champion's agreement with the teacher on the day's logged inputs."""

    rows: int
    agreement: float
    cohen_kappa: float
    reference_agreement: float | None
    drop: float | None
    champion_train_id: str


def shadow_evaluation(
    predict: Callable[[Sequence[str]], Sequence[int]],
    texts: Sequence[str],
    teacher_labels: Sequence[int],
    *,
    reference_agreement: float | None,
    champion_train_id: str,
) -> ShadowEvaluation:
    from distill_pipeline.students.evaluation import agreement

    predicted = list(predict(texts))
    scores = agreement(predicted, teacher_labels)
    rate = float(scores["agreement"])
    drop = None if reference_agreement is None else float(reference_agreement) - rate
    return ShadowEvaluation(
        len(texts), rate, float(scores["cohen_kappa"]), reference_agreement, drop, champion_train_id
    )


# --- signals and drift events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftSignal:
    name: str
    value: float | None
    threshold: float
    fired: bool
    detail: str = ""


@dataclass
class DriftReport:
    """Everything measured for one day; ``signals`` decide whether it drifted."""

    day: str
    rows: int
    reference: str
    reference_rows: int
    length: LengthDrift | None = None
    vocabulary: VocabularyDrift | None = None
    embedding: EmbeddingDrift | None = None
    label_rate: LabelRateDrift | None = None
    shadow: ShadowEvaluation | None = None
    feedback: list[FeedbackRates] = field(default_factory=list)
    signals: list[DriftSignal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: The day's served traffic (call kinds, live agreement, the prior); None before any was read.
    live: LiveReport | None = None
    #: Rows with a teacher label the label rate was measured on (None: ``rows``).
    labelled_rows: int | None = None

    @property
    def drifting(self) -> bool:
        return any(signal.fired for signal in self.signals)

    def fired(self) -> list[DriftSignal]:
        return [signal for signal in self.signals if signal.fired]

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["feedback"] = [rates.to_dict() for rates in self.feedback]
        body["live"] = None if self.live is None else self.live.to_dict()
        body["drifting"] = self.drifting
        return body


def evaluate_signals(report: DriftReport, config: MonitoringConfig) -> list[DriftSignal]:
    """Each statistic against its threshold. A day with too few rows raises no signal."""
    enough = report.rows >= config.min_rows
    why = "" if enough else f"only {report.rows} rows (< {config.min_rows}): not judged"

    def signal(name: str, value: float | None, threshold: float, over: bool, detail: str = "") -> DriftSignal:
        return DriftSignal(name, value, threshold, bool(enough and value is not None and over), why or detail)

    signals = []
    if report.length is not None:
        psi = report.length.psi
        signals.append(signal(LENGTH_PSI, psi, config.max_length_psi, psi > config.max_length_psi))
    if report.vocabulary is not None:
        increase = report.vocabulary.increase
        signals.append(signal(OOV_INCREASE, increase, config.max_oov_increase, increase > config.max_oov_increase))
    if report.embedding is not None:
        e = report.embedding
        significant = e.p_value < config.embedding_alpha and e.mmd2 > config.min_embedding_mmd
        detail = f"p = {e.p_value:.4f} (alpha {config.embedding_alpha})"
        signals.append(signal(EMBEDDING_MMD, e.mmd2, config.min_embedding_mmd, significant, detail))
    if report.label_rate is not None:
        shift = report.label_rate.shift
        labelled = report.rows if report.labelled_rows is None else report.labelled_rows
        few = labelled < config.min_rows
        signals.append(
            DriftSignal(
                LABEL_RATE_SHIFT,
                shift,
                config.max_label_rate_shift,
                not few and shift > config.max_label_rate_shift,
                f"only {labelled} labelled rows (< {config.min_rows}): not judged" if few else "",
            )
        )
    if report.shadow is not None and report.shadow.drop is not None:
        drop = report.shadow.drop
        signals.append(signal(AGREEMENT_DROP, drop, config.max_agreement_drop, drop > config.max_agreement_drop))
    live = live_agreement_signal(report.live, config)
    if live is not None:
        signals.append(live)
    return signals


def live_agreement_signal(live: LiveReport | None, config: MonitoringConfig) -> DriftSignal | None:
    """The champion's live agreement against its test-set agreement, as a statistical rule.

    The value is how far the top of the 95% Wilson interval lies below the test-set agreement: it
    fires when even the most favourable agreement the day's pairs allow is more than the margin
    short, so a small day (a wide interval) cannot fire it on noise, and a busy day's tiny dip
    inside the margin does not either. Below ``min_live_pairs`` pairs the day is not judged.
    """
    if live is None or live.champion_train_id is None or live.reference_agreement is None:
        return None
    cell = live.agreement_of(live.champion_train_id)
    margin = config.live_agreement_margin
    if cell is None or cell.pairs < config.min_live_pairs:
        pairs = 0 if cell is None else cell.pairs
        detail = f"only {pairs} shadow/sample pairs of {live.champion_train_id} (< {config.min_live_pairs}): not judged"
        return DriftSignal(LIVE_AGREEMENT_DROP, None, margin, False, detail)
    gap = float(live.reference_agreement) - cell.high
    detail = (
        f"live agreement {cell.text()} (shadow and sample) vs {live.reference_agreement:.3f} "
        "on the in-distribution test set"
    )
    return DriftSignal(LIVE_AGREEMENT_DROP, gap, margin, gap > margin, detail)


@dataclass(frozen=True)
class DriftEvent:
    """The start of a stretch of drifting reports: what retraining is launched for, once."""

    day: str
    storage_id: int
    signal: str
    value: float
    threshold: float

    @property
    def run_key(self) -> str:
        return f"drift-{self.day}-{self.storage_id}"


@dataclass(frozen=True)
class ObservedReport:
    """A drift_report materialisation as the retraining sensor sees it, in the order it was recorded."""

    storage_id: int
    day: str
    fired: list[DriftSignal]


def next_drift_event(open_event: bool, reports: Sequence[ObservedReport]) -> tuple[DriftEvent | None, bool]:
    """Walk new reports in order; an event opens on the first drifting report after a healthy one
    and closes on the next healthy one. Returns the newest event that opened (None if none) and
    whether an event is open at the end.

    However many drifting reports accumulated (a paused sensor, a backfill), one open stretch is
    one event, so retraining is launched once; the signal recorded is the one furthest over its
    threshold, relative to the threshold.
    """
    event: DriftEvent | None = None
    for report in reports:
        if not report.fired:
            open_event = False
            continue
        if not open_event:
            worst = max(report.fired, key=_overshoot)
            event = DriftEvent(report.day, report.storage_id, worst.name, float(worst.value or 0.0), worst.threshold)
            open_event = True
    return event, open_event


def _overshoot(signal: DriftSignal) -> float:
    value = signal.value or 0.0
    return value / signal.threshold if signal.threshold > 0 else math.inf


def signals_from_metadata(metadata: Mapping[str, Any]) -> list[DriftSignal]:
    """The fired signals a drift report recorded in its ``signals`` metadata entry."""
    entries = metadata.get("signals") or {}
    return [
        DriftSignal(name, entry.get("value"), float(entry.get("threshold", 0.0)), True, entry.get("detail", ""))
        for name, entry in entries.items()
        if isinstance(entry, Mapping) and entry.get("fired")
    ]


# --- what people read ---------------------------------------------------------------------------------

#: How many earlier days the plots over time show.
HISTORY_DAYS = 60


def report_markdown(report: DriftReport) -> str:
    """The day's numbers as markdown: the signals against their thresholds, then each statistic."""
    from distill_pipeline.core.reporting import markdown_table

    lines = [
        f"**{report.day}**: {report.rows:,} calls"
        + (
            ""
            if report.labelled_rows is None
            else f" ({report.labelled_rows:,} with a teacher label for the label rate)"
        )
        + f" against {report.reference} ({report.reference_rows:,} rows). "
        + ("**Drifting**: " + ", ".join(s.name for s in report.fired()) if report.drifting else "No drift signal."),
        "",
        markdown_table(
            [
                (
                    s.name,
                    "n/a" if s.value is None else f"{s.value:.4f}",
                    f"{s.threshold:.4f}",
                    "yes" if s.fired else "no",
                    s.detail,
                )
                for s in report.signals
            ],
            ["signal", "value", "threshold", "fired", "detail"],
        ),
    ]
    details: list[tuple[str, str]] = []
    if report.length:
        l = report.length  # noqa: E741
        details.append(
            (
                "input length",
                f"median {l.reference_median:.0f} -> {l.current_median:.0f} chars; "
                f"PSI {l.psi:.4f}; KS {l.ks_statistic:.4f} (p = {l.ks_p_value:.3g})",
            )
        )
    if report.vocabulary:
        v = report.vocabulary
        details.append(
            (
                "out-of-vocabulary",
                f"{v.oov_rate:.2%} vs {v.reference_oov_rate:.2%} for fresh reference text; "
                f"most frequent new words: {', '.join(v.top_new_words) or 'none'}",
            )
        )
    if report.embedding:
        e = report.embedding
        details.append(
            (
                "embedding MMD²",
                f"{e.mmd2:.4f}, p = {e.p_value:.4f} ({e.permutations} permutations, {e.rows[0]} vs {e.rows[1]} rows)",
            )
        )
    if report.label_rate:
        r = report.label_rate
        details.append(("teacher label rate", f"{r.current_rate:.2%} vs {r.reference_rate:.2%}"))
    if report.shadow:
        s = report.shadow
        reference = "n/a" if s.reference_agreement is None else f"{s.reference_agreement:.2%}"
        details.append(
            (
                "shadow champion",
                f"agrees with the teacher on {s.agreement:.2%} of {s.rows} rows "
                f"(kappa {s.cohen_kappa:.3f}); {reference} on the in-distribution test set",
            )
        )
    if details:
        lines += ["", markdown_table(details, ["statistic", "value"])]
    if report.live is not None and report.live.calls:
        lines += ["", live_markdown(report.live)]
    if report.feedback:
        lines += ["", feedback_markdown(report.feedback)]
    lines += [f"\n- {note}" for note in report.notes]
    return "\n".join(lines)


def feedback_markdown(rates: Sequence[FeedbackRates]) -> str:
    from distill_pipeline.monitoring.feedback import rates_markdown

    return rates_markdown(rates)


def live_markdown(live: LiveReport) -> str:
    """Served traffic: who answered, the live agreement per student (deferred apart), the prior."""
    from distill_pipeline.core.reporting import markdown_table

    lines = [
        f"**Served traffic**: {live.calls:,} calls, {live.student_served_share:.1%} answered by a student.",
        "",
        markdown_table(
            [(t.call_kind, t.served_by, f"{t.calls:,}", f"{t.share:.1%}") for t in live.traffic],
            ["call kind", "served by", "calls", "share"],
        ),
    ]
    rows = [
        (
            a.train_id,
            "shadow + sample",
            a.text(),
            "unbiased" + (" (champion)" if a.train_id == live.champion_train_id else ""),
        )
        for a in live.agreement
    ] + [(a.train_id, "deferred", a.text(), "biased: the calls the student was unsure of") for a in live.deferred]
    if rows:
        reference = "n/a" if live.reference_agreement is None else f"{live.reference_agreement:.3f}"
        lines += [
            "",
            f"**Live agreement** with the teacher (95% Wilson intervals); the champion agrees {reference} on the "
            "in-distribution test set.",
            "",
            markdown_table(rows, ["student", "pairs", "agreement [95% CI]", "sample"]),
        ]
    if live.invalid_student_answers:
        lines += ["", f"- {live.invalid_student_answers:,} student answers name no label of the task: left out."]
    prior = live.prior
    if prior is not None:
        teacher = "n/a" if prior.teacher_rate is None else prior.teacher_rate.text()
        em = (
            "n/a"
            if prior.em_prior is None
            else f"{prior.em_prior:.3f} (EM on {prior.em_rows:,} of {prior.em_train_id}'s calls)"
        )
        trained = "n/a" if prior.train_prior is None else f"{prior.train_prior:.3f}"
        lines += [
            "",
            markdown_table(
                [
                    ("teacher label rate (no deferred calls)", teacher),
                    ("EM estimate from the student's scores", em),
                    ("champion's training prior", trained),
                ],
                ["share of positives", "value"],
            ),
        ]
    return "\n".join(lines)


def signal_history_markdown(history: Sequence[Mapping[str, Any]]) -> str:
    """Each signal over the days of ``history`` (published report.json bodies), relative to its threshold.

    Plotted as value / threshold so that every signal shares one axis and 1.0 is the line to cross.
    """
    from distill_pipeline.core.reporting import LineSeries, line_plot_markdown

    days = [h["day"] for h in history]
    x = _day_offsets(days)
    series = []
    colours = ("#4f6bed", "#e8793a", "#2a9d8f", "#c0392b", "#8e44ad", "#16a085")
    for name, colour in zip(SIGNALS, colours, strict=True):
        points = [
            (x[i], s["value"] / s["threshold"])
            for i, h in enumerate(history)
            for s in h.get("signals", [])
            if s["name"] == name and s["value"] is not None and s["threshold"]
        ]
        if points:
            series.append(LineSeries(name, [p[0] for p in points], [p[1] for p in points], "o-", colour))
    series.append(LineSeries("threshold", [0, max(x[-1] if x else 0, 1)], [1.0, 1.0], "--", "black"))
    return line_plot_markdown(
        series, title="Drift signals over time", xlabel=_day_axis(days), ylabel="value / threshold"
    )


def prior_history_markdown(history: Sequence[Mapping[str, Any]]) -> str:
    """The share of positives over the days of ``history``: the teacher's rate, the EM estimate, the training prior."""
    from distill_pipeline.core.reporting import LineSeries, line_plot_markdown

    days = [h["day"] for h in history]
    x = _day_offsets(days)
    teacher, em, trained = [], [], []
    for i, h in enumerate(history):
        prior = (h.get("live") or {}).get("prior") or {}
        rate = prior.get("teacher_rate")
        if rate and rate.get("n"):
            teacher.append((x[i], rate["rate"], rate["low"], rate["high"]))
        if prior.get("em_prior") is not None:
            em.append((x[i], prior["em_prior"]))
        if prior.get("train_prior") is not None:
            trained.append((x[i], prior["train_prior"]))
    if not (teacher or em or trained):
        return "_no served traffic with a prior yet_"
    series = []
    if teacher:
        series.append(
            LineSeries("teacher label rate", [p[0] for p in teacher], [p[1] for p in teacher], "o-", "#4f6bed")
        )
        series.append(LineSeries("95% interval", [p[0] for p in teacher], [p[2] for p in teacher], ":", "#4f6bed"))
        series.append(LineSeries("", [p[0] for p in teacher], [p[3] for p in teacher], ":", "#4f6bed"))
    if em:
        series.append(
            LineSeries("EM estimate (student scores)", [p[0] for p in em], [p[1] for p in em], "s-", "#e8793a")
        )
    if trained:
        series.append(
            LineSeries("champion's training prior", [p[0] for p in trained], [p[1] for p in trained], "--", "black")
        )
    return line_plot_markdown(series, title="Share of positives over time", xlabel=_day_axis(days), ylabel="share")


def live_agreement_history_markdown(history: Sequence[Mapping[str, Any]]) -> str:
    """Live agreement per served student over the days of ``history``, with the test-set reference."""
    from distill_pipeline.core.reporting import LineSeries, line_plot_markdown

    days = [h["day"] for h in history]
    x = _day_offsets(days)
    per_student: dict[str, list[tuple[int, float]]] = {}
    reference = []
    for i, h in enumerate(history):
        live = h.get("live") or {}
        for cell in live.get("agreement", []):
            per_student.setdefault(cell["train_id"], []).append((x[i], cell["rate"]))
        if live.get("reference_agreement") is not None:
            reference.append((x[i], live["reference_agreement"]))
    if not per_student:
        return "_no shadow or sample pairs yet_"
    series = [
        LineSeries(f"{train_id} (live)", [p[0] for p in points], [p[1] for p in points], "o-")
        for train_id, points in sorted(per_student.items())
    ]
    if reference:
        series.append(
            LineSeries("champion on its test set", [p[0] for p in reference], [p[1] for p in reference], "--", "black")
        )
    return line_plot_markdown(
        series, title="Live agreement with the teacher", xlabel=_day_axis(days), ylabel="agreement"
    )


def feedback_history_markdown(history: Sequence[Mapping[str, Any]]) -> str:
    """Thumbs-down and regenerate rates per model over the days of ``history``."""
    from distill_pipeline.core.reporting import LineSeries, line_plot_markdown

    days = [h["day"] for h in history]
    x = _day_offsets(days)
    per_model: dict[str, list[tuple[int, float, float]]] = {}
    for i, h in enumerate(history):
        for rates in h.get("feedback", []):
            per_model.setdefault(rates["model"], []).append((x[i], rates["thumbs_down_rate"], rates["regenerate_rate"]))
    series = []
    for model, points in sorted(per_model.items()):
        series.append(LineSeries(f"{model} thumbs down", [p[0] for p in points], [p[1] for p in points], "o-"))
        series.append(LineSeries(f"{model} regenerated", [p[0] for p in points], [p[2] for p in points], "s--"))
    if not series:
        return "_no feedback logged_"
    return line_plot_markdown(series, title="User feedback over time", xlabel=_day_axis(days), ylabel="share of calls")


def _day_offsets(days: Sequence[str]) -> list[int]:
    """Days since the first one, so that gaps between reported days show as gaps."""
    import datetime as dt

    if not days:
        return []
    first = dt.date.fromisoformat(days[0])
    return [(dt.date.fromisoformat(day) - first).days for day in days]


def _day_axis(days: Sequence[str]) -> str:
    return f"days since {days[0]} (to {days[-1]})" if days else "day"
