"""The HTTP face of the student server (FastAPI): OpenAI-compatible chat, classify, feedback, probes.

Every request body is hostile until validated: a size cap before it is read whole, pydantic
models with bounds on every list and string, a cap on the task input (truncated or refused, as
configured) and a cap on requests in flight. Errors come back in the OpenAI error shape, so an
OpenAI SDK raises them as it would raise the provider's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from distill_pipeline.logs.schema import MAX_REQUEST_ID_CHARS, FeedbackEvent, new_request_id
from distill_pipeline.serving.batching import NoStudent, Overloaded
from distill_pipeline.serving.deployments import Deployment
from distill_pipeline.serving.prompts import PromptMatcher, answer_text
from distill_pipeline.serving.service import Caller, NoTeacher, Outcome, ServingService, TeacherUnavailable

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_MESSAGES = 64
MAX_CLASSIFY_TEXTS = 256


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 1 << 20
    max_input_chars: int = 20_000
    input_mode: Literal["truncate", "refuse"] = "truncate"
    max_in_flight: int = 512
    admin_token: str | None = None


# ------------------------------------------------------------------------------------ bodies
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    # The OpenAI API takes many optional parameters; the student ignores those it has no use for.
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    user: str | None = Field(default=None, max_length=256)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(default=None, max_length=200)
    texts: list[str] = Field(min_length=1, max_length=MAX_CLASSIFY_TEXTS)
    user: str | None = Field(default=None, max_length=256)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS)
    thumbs: Literal["up", "down"] | None = None
    regenerate: Literal[True] | None = None
    user: str | None = Field(default=None, max_length=256)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.retry_after_s = retry_after_s


def _error_response(status: int, message: str, kind: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(math.ceil(retry_after_s))} if retry_after_s is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "code": kind, "param": None}}, status, headers)


# ------------------------------------------------------------------------------- middleware
class GuardMiddleware:
    """A body larger than ``max_body_bytes`` is refused (413) before it is read whole, whether or not
    it says its length; more than ``max_in_flight`` requests at once are refused (503)."""

    def __init__(self, app: Any, limits: HttpLimits, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.limits = limits
        self.on_reject = on_reject
        self.in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            self.on_reject("body_too_large")
            await _error_response(413, f"the request body is over {limit} bytes", "request_too_large")(
                scope, receive, send
            )
            return
        probe = scope["path"] in ("/healthz", "/readyz", "/metrics")
        if not probe and self.in_flight >= self.limits.max_in_flight:
            self.on_reject("in_flight")
            response = _error_response(
                503, f"the server has {self.in_flight} requests in flight; retry later", "overloaded", 1.0
            )
            await response(scope, receive, send)
            return
        if declared is None:
            # No length given (chunked): read the body up to the cap here, then hand it on whole.
            # With a length, the HTTP server itself never reads past it.
            chunks: list[bytes] = []
            total = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                if total > limit:
                    self.on_reject("body_too_large")
                    await _error_response(413, f"the request body is over {limit} bytes", "request_too_large")(
                        scope, receive, send
                    )
                    return
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            receive = replay
        self.in_flight += not probe
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= not probe


# ---------------------------------------------------------------------------------- the app
def create_app(service: ServingService, limits: HttpLimits, *, on_startup: Callable[[], None] | None = None) -> FastAPI:
    matcher = PromptMatcher(service.task)
    metrics = service.metrics
    task = service.task

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        service.watcher.start()
        refresher = asyncio.create_task(_refresh_deployments())
        if on_startup is not None:
            on_startup()
        try:
            yield
        finally:
            refresher.cancel()
            await service.drain()
            service.watcher.stop()
            await service.batcher.stop()
            for logger in (service.call_logger, service.feedback_logger):
                if logger is not None:
                    await asyncio.to_thread(logger.close, 60.0)
            if service.teacher is not None:
                service.teacher.close()

    async def _refresh_deployments() -> None:
        while True:
            errors = service.deployments.reload_errors
            await asyncio.to_thread(service.deployments.refresh)
            if service.deployments.reload_errors > errors:
                metrics.config_reload_errors.inc()
            metrics.queue_depth.set(service.batcher.depth)
            await asyncio.sleep(1.0)

    app = FastAPI(title="distill-pipeline student server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(GuardMiddleware, limits=limits, on_reject=lambda why: metrics.rejected.labels(why).inc())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()[:10]
        )
        return _error_response(400, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, str(exc), exc.kind, exc.retry_after_s)

    def _observe(route: str, started: float, status: int, served_by: str = "none") -> None:
        metrics.requests.labels(route, str(status), served_by).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _deployment(name: str | None) -> tuple[str, Deployment]:
        names = service.deployments.names()
        if name is None and len(names) == 1:
            name = names[0]
        deployment = service.deployments.get(name) if name is not None else None
        if deployment is None:
            raise ApiError(404, f"no deployment {name!r}; the deployments are {', '.join(names)}", "model_not_found")
        return name, deployment  # type: ignore[return-value]

    def _caller(request: Request, user: str | None) -> Caller:
        tenant = request.headers.get("x-tenant-id")
        return Caller(user or request.headers.get("x-user-id") or "anonymous", tenant[:256] if tenant else None)

    def _request_id(request: Request) -> str:
        given = request.headers.get("x-request-id")
        if given is None:
            return new_request_id()
        if not _REQUEST_ID.fullmatch(given):
            raise ApiError(
                400, "x-request-id must be 1 to 128 letters, digits, '.', '_', ':' or '-'", "invalid_request_error"
            )
        return given

    def _bounded_input(text: str) -> tuple[str, bool]:
        if len(text) <= limits.max_input_chars:
            return text, False
        if limits.input_mode == "refuse":
            raise ApiError(
                413,
                f"the input is {len(text):,} characters, over the limit of {limits.max_input_chars:,}; shorten it",
                "input_too_long",
            )
        return text[: limits.max_input_chars], True

    async def _call(name: str, deployment: Deployment, template, text: str, caller: Caller, request_id: str) -> Outcome:
        text, truncated = _bounded_input(text)
        try:
            return await service.call(
                name, deployment, template, text, caller, request_id=request_id, truncated=truncated
            )
        except Overloaded as exc:
            metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, str(exc), "rate_limit_exceeded", retry_after_s=exc.retry_after_s) from None
        except NoStudent as exc:
            raise ApiError(503, f"{exc}; retry shortly", "not_ready", retry_after_s=5.0) from None
        except (TeacherUnavailable, NoTeacher) as exc:
            raise ApiError(503, str(exc), "teacher_unavailable", retry_after_s=5.0) from None

    def _student_tokens(text: str) -> int:
        engine = service.watcher.engine()
        with contextlib.suppress(Exception):
            if engine is not None:
                return int(engine.count_tokens(text))
        return math.ceil(len(text) / 4)

    def _distill(outcome: Outcome) -> dict[str, Any]:
        student = outcome.student
        return {
            "request_id": outcome.request_id,
            "served_by": outcome.served_by,
            "call_kind": outcome.call_kind,
            "rollout": outcome.mode,
            "train_id": None if student is None else student.train_id,
            "probabilities": None if student is None else {str(k): v for k, v in student.probabilities.items()},
            "truncated": outcome.truncated,
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> JSONResponse:
        started = time.perf_counter()
        request_id = _request_id(request)
        if body.stream:
            raise ApiError(
                400,
                "stream: true is not supported: the answer is one short JSON object; send stream: false",
                "invalid_request_error",
            )
        name, deployment = _deployment(body.model)
        messages = [m.model_dump() for m in body.messages]
        recognised = matcher.recognise(messages)
        if recognised is None:
            if service.teacher is None:
                raise ApiError(
                    400,
                    f"this conversation is not one of the task's prompts ({', '.join(task.prompts)}: one user "
                    "message rendering a template) and no teacher is configured to pass it to",
                    "unsupported_request",
                )
            try:
                passed = await service.teacher.pass_through(body.model_dump(), deployment.teacher_model)
            except Exception as exc:
                _observe("chat", started, 502, "teacher")
                raise ApiError(502, f"the teacher failed: {type(exc).__name__}: {exc}"[:500], "teacher_error") from None
            metrics.calls.labels(name, "pass_through").inc()
            _observe("chat", started, 200, "teacher")
            return JSONResponse(passed, headers={"x-request-id": request_id})
        outcome = await _call(
            name, deployment, recognised.template, recognised.input, _caller(request, body.user), request_id
        )
        if outcome.served_by == "student":
            assert outcome.student is not None
            content = answer_text(task.label, outcome.student.label)
            prompt_tokens = _student_tokens(recognised.template.render(outcome.input))
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": _student_tokens(content)}
        else:
            assert outcome.teacher is not None and outcome.teacher.response is not None
            content = outcome.teacher.response
            usage = dict(outcome.teacher.usage or {})
            usage.setdefault("prompt_tokens", math.ceil(len(recognised.template.render(outcome.input)) / 4))
            usage.setdefault("completion_tokens", math.ceil(len(content) / 4))
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        _observe("chat", started, 200, outcome.served_by)
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "system_fingerprint": outcome.student.train_id if outcome.student else None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
                "distill": _distill(outcome),
            },
            headers={"x-request-id": request_id},
        )

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
        started = time.perf_counter()
        batch_id = _request_id(request)
        name, deployment = _deployment(body.model)
        template = service.default_template(deployment)
        caller = _caller(request, body.user)
        outcomes = await asyncio.gather(
            *(_call(name, deployment, template, text, caller, f"{batch_id}-{i}") for i, text in enumerate(body.texts)),
            return_exceptions=True,
        )
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            if isinstance(failure, ApiError):
                _observe("classify", started, failure.status)
            raise failure
        results = []
        for outcome in outcomes:
            assert isinstance(outcome, Outcome)
            label = outcome.label(task)
            results.append(
                {
                    "label": label,
                    "label_name": None if label is None else task.label.name_of(label),
                    "teacher_response": outcome.teacher.response
                    if outcome.served_by == "teacher" and outcome.teacher
                    else None,
                    **_distill(outcome),
                }
            )
        served = {r["served_by"] for r in results}
        _observe("classify", started, 200, served.pop() if len(served) == 1 else "mixed")
        return JSONResponse({"id": batch_id, "model": name, "results": results}, headers={"x-request-id": batch_id})

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request) -> JSONResponse:
        verdict: dict[str, Any] = {}
        if body.thumbs is not None:
            verdict["thumbs"] = body.thumbs
        if body.regenerate:
            verdict["regenerate"] = True
        try:
            event = FeedbackEvent(body.request_id, verdict, user_id=body.user or request.headers.get("x-user-id"))
        except ValueError as exc:
            raise ApiError(400, f"invalid feedback: {exc}", "invalid_request_error") from None
        await asyncio.to_thread(service.feedback, event)
        metrics.requests.labels("feedback", "202", "none").inc()
        return JSONResponse({"request_id": event.request_id, "accepted": True}, status_code=202)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "distill-pipeline"} for n in service.deployments.names()],
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        watcher = service.watcher
        body = {
            "ready": watcher.loaded is not None,
            "train_id": watcher.train_id,
            "smoke_test": watcher.loaded.smoke.describe() if watcher.loaded else None,
            "last_refusal": None if watcher.last_refusal is None else watcher.last_refusal.__dict__,
            "store_error": watcher.last_error,
        }
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        metrics.queue_depth.set(service.batcher.depth)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -------------------------------------------------------------------------------- admin
    def _admin(request: Request) -> None:
        if not limits.admin_token:
            raise ApiError(
                403, "the admin endpoints are off: set DISTILL_SERVE_ADMIN_TOKEN to turn them on", "forbidden"
            )
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), limits.admin_token.encode()):
            raise ApiError(401, "a valid admin token is needed (Authorization: Bearer ...)", "unauthorized")

    @app.get("/admin/deployments")
    async def get_deployments(request: Request) -> dict[str, Any]:
        _admin(request)
        return service.deployments.describe()

    @app.put("/admin/deployments/{name}")
    async def put_deployment(name: str, body: Deployment, request: Request) -> dict[str, Any]:
        _admin(request)
        if not re.fullmatch(r"[A-Za-z0-9._/-]{1,200}", name):
            raise ApiError(
                400, "a deployment name is 1 to 200 letters, digits, '.', '_', '/' or '-'", "invalid_request_error"
            )
        if body.prompt_id is not None and body.prompt_id not in task.prompts:
            raise ApiError(
                400, f"no prompt {body.prompt_id!r}; the task's are {', '.join(task.prompts)}", "invalid_request_error"
            )
        service.deployments.put(name, body)
        return {name: body.model_dump()}

    @app.post("/admin/champion/reload")
    async def reload_champion(request: Request) -> dict[str, Any]:
        _admin(request)
        outcome = await asyncio.to_thread(service.watcher.check, retry_refused=True)
        return {"outcome": outcome, "train_id": service.watcher.train_id}

    return app
