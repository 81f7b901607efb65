"""The served student: an engine that answers a batch of texts, loaded from a champion manifest and
smoke-tested before it may serve.

Two engines answer the same way (a label and its probabilities per text):

- :class:`AdapterEngine`: an encoder (or small decoder) adapter, loaded in this process through the
  trainer's ``load_student``, run one batch at a time in the micro-batcher's worker thread;
- :class:`UpstreamEngine`: a decoder adapter served by an OpenAI-compatible server that loads PEFT
  adapters (vLLM with ``--enable-lora``, LoRAX), addressed by the adapter's train id as its model
  name; this server is then the router in front of it. Its ``/v1/completions`` gets the student's
  own prompt template (the decoder was trained on it, not on a chat template) and the label is read
  from the answer, its probability from the returned log-probabilities of the labels' first tokens.

A candidate is smoke-tested on the frozen test set its manifest was scored on: it must reach the
accuracy the pipeline recorded for it, less a tolerance (its agreement with the teacher labels,
which are that set's labels), or ``min_agreement`` where no score was recorded.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from distill_pipeline.core.layout import test_sets_prefix
from distill_pipeline.core.published import TestSets
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.task import LabelSpec
from distill_pipeline.students.adapters import fetch_adapter

log = logging.getLogger(__name__)

#: The frozen test set a candidate is smoke-tested on: the traffic-shaped one.
SMOKE_TEST_SET = "in_distribution"


@dataclass(frozen=True)
class StudentAnswer:
    """One text's answer: the label value and the probability of each label value."""

    label: int
    probabilities: dict[int, float]
    train_id: str
    latency_ms: float


class Engine(Protocol):
    """What the server needs of a student; ``predict`` runs in a worker thread, never on the event loop."""

    train_id: str
    kind: str
    label_values: tuple[int, ...]

    def predict(self, texts: Sequence[str]) -> list[StudentAnswer]: ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...


class SwapRefused(RuntimeError):
    """A candidate did not load or did not pass its smoke test; the engine in use keeps serving."""


@dataclass
class AdapterEngine:
    """A trainer-written adapter run in this process."""

    student: Any
    train_id: str
    batch_size: int = 32
    kind: str = field(init=False)
    label_values: tuple[int, ...] = field(init=False)
    _counting_tokenizer: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.kind = "encoder" if type(self.student.codec).__name__ == "EncoderCodec" else "decoder"
        self.label_values = tuple(int(v) for v in self.student.labels.values)
        # A fast tokenizer keeps its truncation setting in shared state, set by every call: counting
        # a request's tokens (truncation off) on the request's thread while the forward-pass thread
        # encodes a batch (truncation on) lets one call run with the other's setting. Counting gets
        # a tokenizer of its own.
        self._counting_tokenizer = copy.deepcopy(self.student.codec.tokenizer)

    def predict(self, texts: Sequence[str]) -> list[StudentAnswer]:
        started = time.perf_counter()
        # The training prior: one request says nothing about the share of positives in traffic.
        labels, probabilities = self.student.predict(list(texts), batch_size=self.batch_size)
        latency_ms = (time.perf_counter() - started) * 1000.0
        answers = []
        for label, row in zip(labels, probabilities, strict=True):
            if not all(math.isfinite(p) for p in row):
                raise ValueError(f"the student {self.train_id} gave a non-finite probability")
            answers.append(
                StudentAnswer(
                    int(label), dict(zip(self.label_values, map(float, row), strict=True)), self.train_id, latency_ms
                )
            )
        return answers

    def count_tokens(self, text: str) -> int:
        return len(self._counting_tokenizer(text, truncation=False)["input_ids"])

    def close(self) -> None:
        self.student = None


class UpstreamError(RuntimeError):
    """The decoder server did not answer, or answered with no label."""


@dataclass
class UpstreamEngine:
    """A decoder adapter served by an OpenAI-compatible server that loads PEFT adapters (vLLM, LoRAX)."""

    url: str
    train_id: str
    prompt_template: str
    label_values: tuple[int, ...]
    label_names: tuple[str, ...]
    model_name: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0
    max_concurrency: int = 32
    kind: str = "decoder"

    def __post_init__(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(base_url=self.url.rstrip("/"), timeout=self.timeout_s, headers=headers)
        # vLLM and LoRAX batch concurrent requests themselves (continuous batching): a micro-batch
        # goes out as concurrent requests rather than one after another.
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"upstream-{self.train_id[:8]}")

    @property
    def served_model(self) -> str:
        return self.model_name or self.train_id

    def predict(self, texts: Sequence[str]) -> list[StudentAnswer]:
        return list(self._pool.map(self._one, texts))

    def _one(self, text: str) -> StudentAnswer:
        import httpx

        started = time.perf_counter()
        body = {
            "model": self.served_model,
            "prompt": self.prompt_template.replace("{input}", text),
            "max_tokens": 4,
            "temperature": 0.0,
            "logprobs": 5,
        }
        try:
            response = self._client.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the decoder server at {self.url} did not answer: {exc!r}") from exc
        if response.status_code != 200:
            raise UpstreamError(
                f"the decoder server at {self.url} answered {response.status_code}: {response.text[:300]}"
            )
        choice = response.json()["choices"][0]
        answer = str(choice.get("text") or "").strip().lower()
        names = [name.lower() for name in self.label_names]
        label_index = next((i for i, name in enumerate(names) if answer.startswith(name)), None)
        if label_index is None:
            raise UpstreamError(f"the decoder server's answer {answer[:80]!r} is none of the labels {self.label_names}")
        probabilities = self._label_probabilities(choice, label_index)
        latency_ms = (time.perf_counter() - started) * 1000.0
        return StudentAnswer(self.label_values[label_index], probabilities, self.train_id, latency_ms)

    def _label_probabilities(self, choice: dict[str, Any], label_index: int) -> dict[int, float]:
        """Softmax over the labels' first tokens' log-probabilities at the first position; where the
        server returned none, the answered label gets probability 1 (hybrid then never defers)."""
        logprobs = choice.get("logprobs") or {}
        top = (logprobs.get("top_logprobs") or [None])[0] or {}
        scores = []
        for name in self.label_names:
            matching = [
                lp for token, lp in top.items() if token.strip() and name.lower().startswith(token.strip().lower())
            ]
            scores.append(max(matching) if matching else None)
        if top and all(s is not None for s in scores):
            peak = max(scores)  # type: ignore[type-var]
            weights = [math.exp(s - peak) for s in scores]  # type: ignore[operator]
            total = sum(weights)
            return {v: w / total for v, w in zip(self.label_values, weights, strict=True)}
        return {v: float(i == label_index) for i, v in enumerate(self.label_values)}

    def count_tokens(self, text: str) -> int:
        # The upstream's tokenizer is not here; an upper estimate, as the teacher client makes one.
        return math.ceil(len(text) / 3.0)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()


@dataclass(frozen=True)
class SmokeResult:
    rows: int
    agreement: float
    floor: float
    reference: float | None

    def describe(self) -> str:
        against = (
            f"its recorded {self.reference:.4f} less the tolerance" if self.reference is not None else "min_agreement"
        )
        return f"agreement with the teacher labels {self.agreement:.4f} on {self.rows} rows; floor {self.floor:.4f} ({against})"


@dataclass(frozen=True)
class SmokeSettings:
    tolerance: float = 0.02
    min_agreement: float = 0.7
    # None: every row of the test set (the recorded score was measured on all of them).
    max_rows: int | None = None


def smoke_test(
    engine: Engine, texts: Sequence[str], labels: Sequence[int], recorded: float | None, settings: SmokeSettings
) -> SmokeResult:
    """Score ``engine`` on the frozen test rows; raise :class:`SwapRefused` below the floor."""
    if settings.max_rows is not None:
        texts, labels = texts[: settings.max_rows], labels[: settings.max_rows]
    if not texts:
        raise SwapRefused("the smoke test set has no rows")
    answers = engine.predict(texts)
    known = set(engine.label_values)
    if any(a.label not in known for a in answers):
        raise SwapRefused(f"the student {engine.train_id} answered labels outside {sorted(known)}")
    agreement = sum(a.label == int(y) for a, y in zip(answers, labels, strict=True)) / len(texts)
    if recorded is None:
        floor = settings.min_agreement
    else:
        # A subsample scores with sampling noise the recorded score (all rows) does not have.
        noise = 0.0
        if settings.max_rows is not None:
            noise = 1.96 * math.sqrt(max(recorded * (1 - recorded), 1e-4) / len(texts))
        floor = recorded - settings.tolerance - noise
    result = SmokeResult(len(texts), agreement, floor, recorded)
    if agreement < floor:
        raise SwapRefused(f"the student {engine.train_id} failed its smoke test: {result.describe()}")
    return result


@dataclass(frozen=True)
class LoadSettings:
    device: str = "cpu"
    batch_size: int = 32
    # Decoder students are forwarded to this OpenAI-compatible server (vLLM --enable-lora, LoRAX).
    decoder_upstream: str | None = None
    decoder_api_key: str | None = field(default=None, repr=False)
    smoke: SmokeSettings = field(default_factory=SmokeSettings)


@dataclass
class Loaded:
    engine: Engine
    manifest: dict[str, Any]
    smoke: SmokeResult
    load_s: float


def recorded_accuracy(manifest: dict[str, Any], test_set: str = SMOKE_TEST_SET) -> float | None:
    value = ((manifest.get("metrics") or {}).get(test_set) or {}).get("accuracy")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def smoke_rows(store: ObjectStore, manifest: dict[str, Any], directory: Path) -> tuple[list[str], list[int]]:
    """The texts and labels of the frozen test set the champion was scored on."""
    import pyarrow.parquet as pq

    version = manifest.get("test_sets_version")
    if not isinstance(version, int):
        raise SwapRefused("the champion manifest names no test_sets_version to smoke-test on")
    try:
        path = TestSets(store).table({"prefix": test_sets_prefix(version)}, SMOKE_TEST_SET, directory)
    except Exception as exc:
        raise SwapRefused(f"the frozen test set v{version} cannot be read for the smoke test: {exc}") from exc
    table = pq.read_table(path, columns=["input", "label"])
    return [str(t) for t in table.column("input").to_pylist()], [int(v) for v in table.column("label").to_pylist()]


def load_champion(store: ObjectStore, manifest: dict[str, Any], label: LabelSpec, settings: LoadSettings) -> Loaded:
    """Fetch, load and smoke-test the student a champion manifest names; :class:`SwapRefused` if it cannot serve."""
    from distill_pipeline.students.predict import load_adapter_student

    started = time.perf_counter()
    train_id = str(manifest.get("train_id") or "")
    prefix = manifest.get("adapter_prefix")
    if not train_id or not isinstance(prefix, str):
        raise SwapRefused("the champion manifest has no train_id or adapter_prefix")
    with tempfile.TemporaryDirectory(prefix="distill-serve-") as folder:
        try:
            texts, labels = smoke_rows(store, manifest, Path(folder) / "test")
            meta = json.loads(store.get_bytes(prefix + "adapter/student.json"))
            if tuple(int(v) for v in meta["label_values"]) != tuple(label.values):
                raise SwapRefused(
                    f"the student {train_id} has labels {meta['label_values']}, the task {list(label.values)}"
                )
            engine: Engine
            if meta.get("student_kind") == "decoder" and settings.decoder_upstream:
                engine = UpstreamEngine(
                    settings.decoder_upstream,
                    train_id,
                    meta["prompt_template"],
                    tuple(int(v) for v in meta["label_values"]),
                    tuple(str(n) for n in meta["label_names"]),
                    api_key=settings.decoder_api_key,
                )
            else:
                adapter = fetch_adapter(store, prefix, Path(folder) / "adapter")
                student = load_adapter_student(adapter, device=settings.device, log=log.info)
                engine = AdapterEngine(student, train_id, settings.batch_size)
        except SwapRefused:
            raise
        except Exception as exc:  # whatever a broken adapter raises, the old champion keeps serving
            raise SwapRefused(f"the student {train_id} did not load: {type(exc).__name__}: {exc}") from exc
    try:
        result = smoke_test(engine, texts, labels, recorded_accuracy(manifest), settings.smoke)
    except SwapRefused:
        engine.close()
        raise
    except Exception as exc:
        engine.close()
        raise SwapRefused(f"the student {train_id} failed on its smoke test: {type(exc).__name__}: {exc}") from exc
    return Loaded(engine, manifest, result, time.perf_counter() - started)
