"""The teacher client: a task's prompts sent to any litellm model, fast, within limits, paid once.

``TeacherClient.label`` answers a list of inputs with one teacher (a litellm model string, a
prompt template of the task, sampling parameters). Every input whose key is in the
:class:`~distill_pipeline.teachers.ledger.Ledger` is answered from it; the rest are called through
``litellm.acompletion`` by a bounded pool of workers:

- a client-side pacer keeps to the configured requests- and tokens-per-minute, spacing requests
  evenly rather than bursting, so a provider's sliding window never sees more than the limit;
- a 429 pauses every worker for its ``Retry-After`` (the limit is the account's, not the
  request's), and the request is retried with exponential backoff and full jitter; 5xx answers,
  timeouts and dropped connections are retried the same way;
- after the retries, a configured fallback model gets the request;
- every answer is written to the ledger the moment it arrives, with its tokens and cost (the
  configured price table first, else litellm's price map);
- a budget cap is checked before each call against what was spent plus what calls in flight
  may still cost, so a run stops before it overspends, and everything paid for is kept;
- the key is registered as a secret, and every provider error and answer is redacted
  (:mod:`~distill_pipeline.core.secrets`) before it is logged, returned or kept: a provider or
  proxy that quotes the credentials it received leaks them nowhere.

litellm's own retries and Router limits are not used: the Router refuses requests over its
rpm/tpm instead of pacing them, and its retries do not share a pause across concurrent requests,
so both would waste requests against a provider that is already refusing them. litellm is
imported inside the client, never at module load: the code location must load without it.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from distill_pipeline.core.backoff import backoff_delay_s
from distill_pipeline.core.secrets import error_text, redact, register_secret
from distill_pipeline.core.task import LabelSpec, PromptTemplate
from distill_pipeline.data.parsing import parse_label
from distill_pipeline.teachers.ledger import Ledger, LedgerEntry, input_sha256, ledger_key, utc_now
from distill_pipeline.teachers.soft import TOP_LOGPROBS, distribution_from_logprobs, to_json_keys

log = logging.getLogger(__name__)

# Characters per token, rounded down so that token estimates err on the high side (a budget
# check and a tokens-per-minute pacer must not under-count).
_CHARS_PER_TOKEN_LOW = 3.0
_CHAT_OVERHEAD_TOKENS = 8
_ERROR_CHARS = 300


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher configuration: the model, the task's prompt template, the sampling parameters."""

    model: str
    prompt_id: str = "simple_prompt"
    # None: the provider's default (not sent), as logs without a recorded temperature had it.
    temperature: float | None = 0.0
    max_tokens: int = 256
    fallback_model: str | None = None
    # Ask for the answer tokens' log-probabilities, from which each answer's label distribution
    # (a soft label) is computed; providers that do not return them leave it unset.
    logprobs: bool = False

    @property
    def params(self) -> dict[str, Any]:
        temperature = None if self.temperature is None else float(self.temperature)
        params: dict[str, Any] = {"temperature": temperature, "max_tokens": int(self.max_tokens)}
        if self.logprobs:
            # Part of the ledger key: an answer cached without log-probabilities has no soft label.
            params["top_logprobs"] = TOP_LOGPROBS
        return params

    @property
    def name(self) -> str:
        temperature = "default" if self.temperature is None else f"{self.temperature:g}"
        return f"{self.model} / {self.prompt_id} / T={temperature}"


@dataclass(frozen=True)
class ClientSettings:
    """How the client talks to providers; one set of limits is shared by every teacher it runs."""

    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)
    rpm: float | None = None
    tpm: float | None = None
    max_concurrency: int = 16
    timeout_s: float = 60.0
    max_retries: int = 8
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    budget_usd: float | None = None
    prices: Mapping[str, Price] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise TeacherConfigError("max_concurrency must be at least 1")
        if (self.rpm is not None and self.rpm <= 0) or (self.tpm is not None and self.tpm <= 0):
            raise TeacherConfigError("rpm and tpm must be positive when set")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise TeacherConfigError("budget_usd must not be negative")


class TeacherConfigError(ValueError):
    """The teacher configuration cannot work (an unpriced model under a budget, ...)."""


class TeacherAuthError(RuntimeError):
    """The provider refused the credentials: every further call would fail the same way."""


class BudgetExceeded(RuntimeError):
    """The next call could take spending past the budget; everything paid so far is in the ledger."""

    def __init__(self, message: str, totals: RunTotals) -> None:
        super().__init__(message)
        self.totals = totals


@dataclass
class RunTotals:
    """What one labelling run asked, paid and spent."""

    inputs: int = 0
    cache_hits: int = 0
    calls: int = 0
    paid_calls: int = 0
    retries: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    timeouts: int = 0
    fallback_calls: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0
    elapsed_s: float = 0.0

    def add_paid_call(self, prompt_tokens: int, completion_tokens: int, cost: float | None) -> None:
        """Count one call the provider billed; a call the price table cannot price is counted apart."""
        self.paid_calls += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if cost is None:
            self.unpriced_calls += 1
        else:
            self.cost_usd += cost

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """The teacher's answer to one input: its response text, or why there is none."""

    key: str
    response: str | None
    error: str | None
    cached: bool
    served_model: str | None
    # The teacher's probability per label value (text keys), from its log-probabilities.
    label_distribution: dict[str, float] | None = None


def render_messages(template: PromptTemplate, task_input: str) -> list[dict[str, str]]:
    """The chat messages for one input: the rendered template as one user message."""
    return [{"role": "user", "content": template.render(task_input)}]


def estimate_tokens(text: str, max_tokens: int) -> int:
    """An upper estimate of a call's tokens before it is made (prompt plus the answer's cap)."""
    return math.ceil(len(text) / _CHARS_PER_TOKEN_LOW) + _CHAT_OVERHEAD_TOKENS + max_tokens


class RequestPacer:
    """Client-side requests- and tokens-per-minute: evenly spaced starts, and a shared pause.

    Even spacing (one start every 60/rpm seconds) rather than a bucket that allows bursts keeps
    every sliding 60-second window at or under the limit, the way providers count. Waiters queue
    on a FIFO lock, so no request starves.
    """

    def __init__(self, rpm: float | None, tpm: float | None) -> None:
        self.interval_s = 60.0 / rpm if rpm else 0.0
        self.tokens_per_s = tpm / 60.0 if tpm else None
        # Ten seconds of tokens: enough to start a few large prompts back to back, not a minute's burst.
        self.token_capacity = tpm / 6.0 if tpm else 0.0
        self.token_level = self.token_capacity
        self._next_start = 0.0
        self._paused_until = 0.0
        self._last_refill = time.monotonic()
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        """Hold every request back for ``seconds`` (a provider's ``Retry-After``)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def wait(self, tokens: int) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                start = max(now, self._next_start, self._paused_until)
                if self.tokens_per_s is not None:
                    self.token_level = min(
                        self.token_capacity, self.token_level + (now - self._last_refill) * self.tokens_per_s
                    )
                    self._last_refill = now
                    # A single call larger than the bucket may start once the bucket is full.
                    needed = min(tokens, self.token_capacity)
                    if self.token_level < needed:
                        start = max(start, now + (needed - self.token_level) / self.tokens_per_s)
                if start <= now:
                    break
                await asyncio.sleep(start - now)
            if self.tokens_per_s is not None:
                self.token_level -= tokens
            self._next_start = max(now, self._next_start) + self.interval_s


def _retry_after_s(exc: BaseException) -> float | None:
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class TeacherClient:
    """Labels inputs with teachers through litellm; answers come from and go to the ledger."""

    def __init__(
        self, settings: ClientSettings, ledger: Ledger, *, progress: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        register_secret(settings.api_key)
        self.ledger = ledger
        self.pacer = RequestPacer(settings.rpm, settings.tpm)
        self.totals = RunTotals()
        self.progress = progress
        self._reserved_usd = 0.0
        self._prices: dict[str, tuple[Price | None, str | None]] = {}

    # ----------------------------------------------------------------- prices
    def price_of(self, model: str) -> tuple[Price | None, str | None]:
        """The configured price, else litellm's, else (None, None)."""
        if model not in self._prices:
            self._prices[model] = self._look_up_price(model)
        return self._prices[model]

    def _look_up_price(self, model: str) -> tuple[Price | None, str | None]:
        prices = self.settings.prices
        price = prices.get(model) or prices.get(model.split("/", 1)[-1])
        if price is not None:
            return price, "table"
        import litellm

        try:
            per_input, per_output = litellm.cost_per_token(
                model=model, prompt_tokens=1_000_000, completion_tokens=1_000_000
            )
        except Exception:  # litellm raises several types for a model it has no price for
            return None, None
        return Price(float(per_input), float(per_output)), "litellm"

    def check_priced(self, spec: TeacherSpec) -> None:
        if self.settings.budget_usd is None:
            return
        for model in filter(None, (spec.model, spec.fallback_model)):
            if self.price_of(model)[0] is None:
                raise TeacherConfigError(
                    f"a budget is set but {model!r} has no price: litellm's price map does not know it; "
                    "add it to the teacher's price table (dollars per million input and output tokens)"
                )

    # ---------------------------------------------------------------- labelling
    def keys_for(self, spec: TeacherSpec, template: PromptTemplate, inputs: Sequence[str]) -> list[str]:
        return [
            ledger_key(
                model=spec.model,
                prompt_id=template.id,
                prompt_version=template.version,
                prompt_sha256=template.sha256,
                params=spec.params,
                task_input=text,
            )
            for text in inputs
        ]

    def label(
        self, spec: TeacherSpec, template: PromptTemplate, inputs: Sequence[str], label: LabelSpec | None = None
    ) -> list[Answer]:
        """Answer every input (blocking); see :meth:`alabel`."""
        return asyncio.run(self.alabel(spec, template, inputs, label))

    async def alabel(
        self, spec: TeacherSpec, template: PromptTemplate, inputs: Sequence[str], label: LabelSpec | None = None
    ) -> list[Answer]:
        """Answer every input, from the ledger where it can; raises BudgetExceeded after keeping what was paid.

        With ``label`` (the task's label spec) and a spec asking for log-probabilities, each new
        answer's label distribution is computed and kept in the ledger with it.
        """
        import litellm

        litellm.suppress_debug_info = True
        self.check_priced(spec)
        started = time.monotonic()
        keys = self.keys_for(spec, template, inputs)
        answers: dict[str, Answer] = {}
        todo: dict[str, str] = {}
        for key, text in zip(keys, inputs, strict=True):
            entry = self.ledger.get(key)
            if entry is not None:
                answers[key] = Answer(key, entry.response, None, True, entry.served_model, entry.label_distribution)
            elif key not in todo:
                todo[key] = text
        self.totals.inputs += len(inputs)
        self.totals.cache_hits += sum(1 for key in keys if key in answers)
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for item in todo.items():
            queue.put_nowait(item)
        stop: list[BaseException] = []
        total = len(todo)

        async def worker() -> None:
            while not stop:
                try:
                    key, text = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    answers[key] = await self._answer(spec, template, key, text, label)
                except (BudgetExceeded, TeacherAuthError) as exc:
                    stop.append(exc)
                    return
                done = len(answers) - self.totals.cache_hits
                if self.progress is not None and done and done % 500 == 0:
                    self.progress(f"{spec.name}: {done:,} of {total:,} calls answered, ${self.totals.cost_usd:.4f}")

        workers = [asyncio.create_task(worker()) for _ in range(min(self.settings.max_concurrency, max(1, total)))]
        try:
            await asyncio.gather(*workers)
        finally:
            self.ledger.sync()
            self.totals.elapsed_s += time.monotonic() - started
        if stop:
            raise stop[0]
        return [answers[key] for key in keys]

    async def _answer(
        self, spec: TeacherSpec, template: PromptTemplate, key: str, text: str, label: LabelSpec | None = None
    ) -> Answer:
        messages = render_messages(template, text)
        error = None
        for model in filter(None, (spec.model, spec.fallback_model)):
            if model != spec.model:
                self.totals.fallback_calls += 1
            try:
                entry = await self._call_with_retries(spec, template, key, model, messages, text, label)
            except (BudgetExceeded, TeacherAuthError):
                raise
            except Exception as exc:  # the provider's final word on this request; try the fallback
                error = error_text(exc)[:_ERROR_CHARS]
                log.warning("teacher %s failed on one input: %s", model, error)
                continue
            return Answer(key, entry.response, None, False, entry.served_model, entry.label_distribution)
        self.totals.failed += 1
        return Answer(key, None, error, False, None)

    def _reserve(self, model: str, estimated_tokens: int, max_tokens: int) -> float:
        budget = self.settings.budget_usd
        if budget is None:
            return 0.0
        price = self.price_of(model)[0]
        assert price is not None  # check_priced ran
        estimate = price.cost(estimated_tokens - max_tokens, max_tokens)
        if self.totals.cost_usd + self._reserved_usd + estimate > budget:
            raise BudgetExceeded(
                f"teacher budget of ${budget:.4f} reached: ${self.totals.cost_usd:.4f} spent, "
                f"${self._reserved_usd:.4f} in flight, next call up to ${estimate:.6f}; "
                "the answers paid so far are kept in the ledger, so a run with a larger budget resumes from them",
                self.totals,
            )
        self._reserved_usd += estimate
        return estimate

    async def _call_with_retries(
        self,
        spec: TeacherSpec,
        template: PromptTemplate,
        key: str,
        model: str,
        messages: list[dict[str, str]],
        text: str,
        label: LabelSpec | None = None,
    ) -> LedgerEntry:
        import litellm

        settings = self.settings
        tokens = estimate_tokens(messages[0]["content"], spec.max_tokens)
        for attempt in range(settings.max_retries + 1):
            reserved = self._reserve(model, tokens, spec.max_tokens)
            try:
                await self.pacer.wait(tokens)
                self.totals.calls += 1
                started = time.monotonic()
                response = await litellm.acompletion(
                    model=model,
                    messages=messages,
                    temperature=spec.temperature,
                    max_tokens=spec.max_tokens,
                    api_base=settings.api_base,
                    api_key=settings.api_key,
                    timeout=settings.timeout_s,
                    # The retries are ours (shared pauses, Retry-After); the SDK's would double them.
                    max_retries=0,
                    **({"logprobs": True, "top_logprobs": TOP_LOGPROBS} if spec.logprobs else {}),
                )
                latency_ms = (time.monotonic() - started) * 1000.0
                return self._keep(spec, template, key, model, text, response, latency_ms, label)
            except litellm.AuthenticationError as exc:
                raise TeacherAuthError(
                    f"{model}: the provider refused the API key ({error_text(exc)[:_ERROR_CHARS]})"
                ) from None
            except (litellm.RateLimitError, litellm.InternalServerError, litellm.ServiceUnavailableError,
                    litellm.Timeout, litellm.APIConnectionError) as exc:  # fmt: skip
                if attempt == settings.max_retries:
                    raise
                retry_after = None
                if isinstance(exc, litellm.RateLimitError):
                    self.totals.rate_limited += 1
                    retry_after = _retry_after_s(exc)
                    if retry_after is not None:
                        self.pacer.pause(retry_after)
                elif isinstance(exc, litellm.Timeout):
                    self.totals.timeouts += 1
                else:
                    self.totals.server_errors += 1
                self.totals.retries += 1
                backoff = backoff_delay_s(attempt, settings.backoff_base_s, settings.backoff_max_s)
                await asyncio.sleep(max(backoff, retry_after or 0.0))
            finally:
                self._reserved_usd -= reserved
        raise AssertionError("unreachable")

    def _keep(
        self,
        spec: TeacherSpec,
        template: PromptTemplate,
        key: str,
        model: str,
        text: str,
        response: Any,
        latency_ms: float,
        label: LabelSpec | None = None,
    ) -> LedgerEntry:
        content = redact(response.choices[0].message.content or "")
        distribution = None
        if spec.logprobs and label is not None:
            distribution = to_json_keys(
                distribution_from_logprobs(_logprob_positions(response), parse_label(content, label).label, label)
            )
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        price, priced_by = self.price_of(model)
        cost = price.cost(prompt_tokens, completion_tokens) if price is not None else None
        entry = LedgerEntry(
            key=key,
            model=spec.model,
            served_model=model,
            prompt_id=template.id,
            prompt_version=template.version,
            params=spec.params,
            input_sha256=input_sha256(text),
            response=content,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            priced_by=priced_by,
            latency_ms=latency_ms,
            created_at=utc_now(),
            label_distribution=distribution,
        )
        self.ledger.record(entry)
        self.totals.add_paid_call(prompt_tokens, completion_tokens, cost)
        return entry


def _logprob_positions(response: Any) -> list[dict[str, Any]]:
    """The completion's per-token log-probabilities as plain dicts; empty where the provider sent none."""
    logprobs = getattr(response.choices[0], "logprobs", None)
    content = getattr(logprobs, "content", None) if logprobs is not None else None
    if content is None and isinstance(logprobs, dict):
        content = logprobs.get("content")
    positions = []
    for position in content or []:
        raw = position if isinstance(position, dict) else position.model_dump()
        positions.append(
            {
                "token": raw.get("token"),
                "logprob": raw.get("logprob"),
                "top_logprobs": [
                    alt if isinstance(alt, dict) else {"token": alt.token, "logprob": alt.logprob}
                    for alt in raw.get("top_logprobs") or []
                ],
            }
        )
    return positions
