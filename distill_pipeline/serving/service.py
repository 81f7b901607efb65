"""One task call through a deployment: who answers, the fallback, and the log record.

:class:`ServingService` joins the parts: the champion watcher (which student serves), the
micro-batcher (how it runs), the teacher, the deployments (who answers, per rollout mode) and the
two loggers (calls, feedback). The HTTP layer (``app.py``) only translates requests and answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from distill_pipeline.core.task import PromptTemplate, Task
from distill_pipeline.data.parsing import parse_label
from distill_pipeline.logs.client import TeacherLogger
from distill_pipeline.logs.schema import FeedbackEvent, LogRecord, new_request_id
from distill_pipeline.serving.batching import MicroBatcher, NoStudent, Overloaded
from distill_pipeline.serving.champion import ChampionWatcher
from distill_pipeline.serving.deployments import Deployment, Deployments
from distill_pipeline.serving.metrics import ServeMetrics
from distill_pipeline.serving.rollout import plan, sampled, unsure
from distill_pipeline.serving.students import StudentAnswer
from distill_pipeline.serving.teacher import ServingTeacher, TeacherReply

log = logging.getLogger(__name__)


class TeacherUnavailable(RuntimeError):
    """The teacher was to answer, failed, and no student answer could take its place."""


class NoTeacher(RuntimeError):
    """The call needs the teacher and none is configured."""


@dataclass
class Outcome:
    """One task call, as answered: who answered, and what each model said."""

    request_id: str
    deployment: str
    mode: str
    call_kind: str
    served_by: str
    template: PromptTemplate
    input: str
    student: StudentAnswer | None
    teacher: TeacherReply | None
    latency_ms: float = 0.0
    truncated: bool = False

    def label(self, task: Task) -> int | None:
        """The label the caller gets: the student's, or the one parsed from the teacher's answer."""
        if self.served_by == "student":
            return None if self.student is None else self.student.label
        return parse_label(self.teacher.response if self.teacher else None, task.label).label


@dataclass
class Caller:
    user_id: str = "anonymous"
    tenant_id: str | None = None


@dataclass
class ServingService:
    task: Task
    deployments: Deployments
    watcher: ChampionWatcher
    batcher: MicroBatcher
    teacher: ServingTeacher | None
    call_logger: TeacherLogger | None
    feedback_logger: TeacherLogger | None
    metrics: ServeMetrics
    #: The teacher model the log records name when no teacher is configured for a deployment.
    teacher_model_name: str = "none"
    #: Teacher calls that may wait for a slot beyond those in flight before new ones are refused.
    max_teacher_waiting: int = 256
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    # ------------------------------------------------------------------ models
    async def _student(self, text: str) -> StudentAnswer:
        (answer,) = await self.batcher.submit([text])
        return answer

    async def _student_or_none(self, text: str) -> StudentAnswer | None:
        """For a student the caller does not wait on (a shadow, a fallback): never raises."""
        try:
            return await self._student(text)
        except (NoStudent, Overloaded):
            return None
        except Exception:
            log.exception("the student failed on a shadow call")
            return None

    async def _teacher(self, deployment: Deployment, template: PromptTemplate, text: str) -> TeacherReply:
        if self.teacher is None:
            raise NoTeacher("no teacher is configured")
        if self.teacher.in_flight >= self.teacher.max_in_flight + self.max_teacher_waiting:
            self.metrics.rejected.labels("teacher_saturated").inc()
            raise Overloaded(f"{self.teacher.in_flight} teacher calls are in flight or waiting", 1.0)
        self.metrics.teacher_in_flight.set(self.teacher.in_flight + 1)
        reply = await self.teacher.answer(template, text, deployment.teacher_model)
        self.metrics.teacher_in_flight.set(self.teacher.in_flight)
        self.metrics.teacher_calls.labels("ok" if reply.response is not None else "failed").inc()
        return reply

    def teacher_model(self, deployment: Deployment) -> str:
        if deployment.teacher_model:
            return deployment.teacher_model
        return self.teacher.spec.model if self.teacher is not None else self.teacher_model_name

    def default_template(self, deployment: Deployment) -> PromptTemplate:
        if deployment.prompt_id:
            return self.task.prompt(deployment.prompt_id)
        if self.teacher is not None and self.teacher.spec.prompt_id in self.task.prompts:
            return self.task.prompt(self.teacher.spec.prompt_id)
        return next(iter(self.task.prompts.values()))

    # ------------------------------------------------------------------ a call
    async def call(
        self,
        name: str,
        deployment: Deployment,
        template: PromptTemplate,
        text: str,
        caller: Caller,
        *,
        request_id: str | None = None,
        truncated: bool = False,
    ) -> Outcome:
        """Answer one task input as the deployment's rollout says, and log it.

        Raises :class:`Overloaded` (answer 429) or :class:`NoStudent` / :class:`TeacherUnavailable`
        / :class:`NoTeacher` (answer 503) when nobody can answer.
        """
        started = time.perf_counter()
        request_id = request_id or new_request_id()
        outcome = await self._route(name, deployment, template, text, caller, request_id)
        outcome.latency_ms = (time.perf_counter() - started) * 1000.0
        outcome.truncated = truncated
        self.metrics.calls.labels(name, outcome.call_kind).inc()
        if outcome.call_kind == "sample":
            # Logged once the teacher's answer is in; the caller does not wait for it.
            task = asyncio.create_task(self._sample(outcome, deployment, caller))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self._log(outcome, deployment, caller)
        return outcome

    async def _route(
        self, name: str, deployment: Deployment, template: PromptTemplate, text: str, caller: Caller, request_id: str
    ) -> Outcome:
        def outcome(kind: str, served_by: str, student: StudentAnswer | None, teacher: TeacherReply | None) -> Outcome:
            return Outcome(request_id, name, deployment.mode, kind, served_by, template, text, student, teacher)

        if self.teacher is None:
            # A server with no teacher: the student answers everything it can.
            return outcome("student", "student", await self._student(text), None)
        if self.watcher.engine() is None:
            # Until a student has passed its smoke test, the teacher answers as it did before.
            reply = await self._teacher(deployment, template, text)
            if reply.response is None:
                raise TeacherUnavailable(f"the teacher failed ({reply.error}) and no student is loaded yet")
            return outcome("teacher", "teacher", None, reply)
        first = plan(name, deployment, caller.user_id)
        if first.teacher_answers:
            shadow = asyncio.create_task(self._student_or_none(text)) if first.student_runs else None
            reply = await self._teacher(deployment, template, text)
            student = await shadow if shadow is not None else None
            if reply.response is not None:
                return outcome("shadow" if student is not None else "teacher", "teacher", student, reply)
            student = student or await self._student(text)
            return outcome("fallback", "student", student, reply)
        student = await self._student(text)
        if deployment.mode == "hybrid" and unsure(deployment, student.probabilities, self.task.label.positive):
            reply = await self._teacher(deployment, template, text)
            if reply.response is None:
                return outcome("fallback", "student", student, reply)
            return outcome("deferred", "teacher", student, reply)
        if deployment.mode == "full" and self.teacher is not None and sampled(deployment, request_id):
            return outcome("sample", "student", student, None)
        return outcome("student", "student", student, None)

    async def _sample(self, outcome: Outcome, deployment: Deployment, caller: Caller) -> None:
        try:
            outcome.teacher = await self._teacher(deployment, outcome.template, outcome.input)
        except Overloaded as exc:
            outcome.teacher = TeacherReply(None, f"not sampled: {exc}", 0.0)
        except Exception as exc:
            outcome.teacher = TeacherReply(None, f"{type(exc).__name__}: {exc}", 0.0)
        self._log(outcome, deployment, caller)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the background teacher samples, so that their records are logged."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout_s)

    # ------------------------------------------------------------------ logging
    def record(self, outcome: Outcome, deployment: Deployment, caller: Caller) -> LogRecord:
        teacher = outcome.teacher
        student = outcome.student
        spec = self.teacher.spec if self.teacher is not None else None
        return LogRecord(
            input=outcome.input,
            model=self.teacher_model(deployment),
            prompt_template_id=outcome.template.id,
            prompt_template_version=outcome.template.version,
            response=None if teacher is None else teacher.response,
            error=None if teacher is None else teacher.error,
            user_id=caller.user_id,
            tenant_id=caller.tenant_id,
            request_id=outcome.request_id,
            task=self.task.id,
            params=spec.params if spec is not None else {},
            usage=None if teacher is None else teacher.usage,
            latency_ms=outcome.latency_ms,
            cost_usd=None if teacher is None else teacher.cost_usd,
            served_by=outcome.served_by,
            rollout=outcome.mode,
            call_kind=outcome.call_kind,
            student=None
            if student is None
            else {
                "train_id": student.train_id,
                "label": student.label,
                "confidence": self._confidence(student),
                "latency_ms": round(student.latency_ms, 3),
            },
        )

    def _confidence(self, answer: StudentAnswer) -> float:
        positive = self.task.label.positive
        if positive is not None and positive in answer.probabilities:
            return round(answer.probabilities[positive], 6)
        return round(answer.probabilities[answer.label], 6)

    def _log(self, outcome: Outcome, deployment: Deployment, caller: Caller) -> None:
        if self.call_logger is None:
            return
        try:
            self.call_logger.log(self.record(outcome, deployment, caller))
        except Exception:
            # The caller has its answer; a log store outage is the logger's to ride out, and
            # beyond its queue it is an error for the operators, not a failed request.
            log.exception("could not log the call %s", outcome.request_id)
        self.metrics.log_queue.set(self.call_logger.stats().records_queued)

    def feedback(self, event: FeedbackEvent) -> None:
        if self.feedback_logger is None:
            raise RuntimeError("no feedback stream is configured")
        self.feedback_logger.log(event)
