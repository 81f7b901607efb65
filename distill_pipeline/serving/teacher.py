"""The teacher behind the server: one call at a time through the pipeline's own teacher client.

Every call the server makes to the teacher goes through :class:`TeacherClient`: its rate limits,
its retries and pause on a 429, the label ledger (a repeated input is answered from it and paid
once) and the budget. The server adds a deadline per call and a bound on calls in flight; a call
that fails, times out or would pass the budget comes back as an error, and the caller falls back to
the student.

A chat request that is not one of the task's prompts is passed to the teacher as it came
(litellm, the same model, key and endpoint), outside the ledger: it is not a task call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from distill_pipeline.core.secrets import error_text
from distill_pipeline.core.task import PromptTemplate
from distill_pipeline.teachers.client import (
    BudgetExceeded,
    ClientSettings,
    TeacherAuthError,
    TeacherClient,
    TeacherSpec,
)
from distill_pipeline.teachers.ledger import Ledger

log = logging.getLogger(__name__)

#: What a passed-through chat request may set besides its messages; the rest is dropped.
PASS_THROUGH_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "seed",
                       "presence_penalty", "frequency_penalty", "response_format", "logprobs", "top_logprobs")  # fmt: skip


class ServingLedger(Ledger):
    """The ledger, publishing its journal at most every ``sync_every_s``.

    The teacher client publishes the journal at the end of every labelling call, which suits a
    batch run; a server makes one call per request, and a publish per request would rewrite the
    segment object (up to thousands of answers) on every call. The journal is still flushed per
    answer, so a killed server loses nothing it paid for; ``close`` publishes the rest.
    """

    def sync(self) -> None:
        if time.monotonic() - self._last_sync < self.sync_every_s:
            return
        super().sync()

    def close(self) -> None:
        self._last_sync = float("-inf")
        super().close()


@dataclass(frozen=True)
class TeacherReply:
    """The teacher's answer to one input: its raw text, or why there is none, and what it cost."""

    response: str | None
    error: str | None
    latency_ms: float
    usage: dict[str, int] | None = None
    cost_usd: float | None = None
    cached: bool = False


@dataclass
class ServingTeacher:
    """The server's teacher: a model, its prompt template and sampling, behind the teacher client."""

    client: TeacherClient
    spec: TeacherSpec
    deadline_s: float = 30.0
    max_in_flight: int = 64
    _slots: asyncio.Semaphore | None = field(default=None, init=False)
    in_flight: int = field(default=0, init=False)

    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_in_flight)
        return self._slots

    async def answer(self, template: PromptTemplate, text: str, model: str | None = None) -> TeacherReply:
        """The teacher's answer to ``text`` rendered in ``template``; never raises for a provider failure."""
        spec = self.spec if model is None or model == self.spec.model else TeacherSpec(
            model, template.id, self.spec.temperature, self.spec.max_tokens, self.spec.fallback_model
        )  # fmt: skip
        started = time.perf_counter()
        self.in_flight += 1
        try:
            async with self._semaphore():
                answers = await asyncio.wait_for(self.client.alabel(spec, template, [text]), self.deadline_s)
        except TimeoutError:
            return TeacherReply(None, f"the teacher did not answer within {self.deadline_s:g}s", _ms(started))
        except BudgetExceeded as exc:
            return TeacherReply(None, f"teacher budget reached: {exc}", _ms(started))
        except TeacherAuthError as exc:
            log.error("the teacher refused the API key: %s", exc)
            return TeacherReply(None, str(exc), _ms(started))
        except Exception as exc:  # a teacher failure is the caller's fallback, never a failed request
            return TeacherReply(None, error_text(exc)[:300], _ms(started))
        finally:
            self.in_flight -= 1
        (reply,) = answers
        if reply.response is None:
            return TeacherReply(None, reply.error or "no answer", _ms(started))
        entry = self.client.ledger.get(reply.key)
        usage = cost = None
        if entry is not None:
            usage = {"prompt_tokens": entry.prompt_tokens, "completion_tokens": entry.completion_tokens,
                     "total_tokens": entry.prompt_tokens + entry.completion_tokens}  # fmt: skip
            # A ledger hit costs this call nothing; the first call paid.
            cost = 0.0 if reply.cached else entry.cost_usd
        return TeacherReply(reply.response, None, _ms(started), usage, cost, reply.cached)

    async def pass_through(self, body: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        """Send a chat request that is not the task's to the teacher; the OpenAI-shaped response."""
        import litellm

        settings: ClientSettings = self.client.settings
        params = {name: body[name] for name in PASS_THROUGH_PARAMS if body.get(name) is not None}
        async with self._semaphore():
            response = await litellm.acompletion(
                model=model or self.spec.model,
                messages=body["messages"],
                api_base=settings.api_base,
                api_key=settings.api_key,
                timeout=min(settings.timeout_s, self.deadline_s),
                **params,
            )
        return response.model_dump()

    def close(self) -> None:
        self.client.ledger.close()


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
