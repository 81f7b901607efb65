"""Building and running the student server from its settings (``distill-pipeline serve``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from distill_pipeline.core.errors import UsageError
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.task import Task
from distill_pipeline.logs.client import TeacherLogger
from distill_pipeline.logs.schema import feedback_object_key
from distill_pipeline.serving.app import HttpLimits, create_app
from distill_pipeline.serving.batching import MicroBatcher
from distill_pipeline.serving.champion import ChampionWatcher
from distill_pipeline.serving.deployments import Deployment, Deployments
from distill_pipeline.serving.metrics import ServeMetrics
from distill_pipeline.serving.service import ServingService
from distill_pipeline.serving.students import LoadSettings
from distill_pipeline.serving.teacher import ServingLedger, ServingTeacher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSettings:
    model: str
    prompt_id: str = "simple_prompt"
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)
    rpm: float | None = None
    tpm: float | None = None
    max_concurrency: int = 64
    timeout_s: float = 20.0
    max_retries: int = 1
    deadline_s: float = 30.0
    budget_usd: float | None = None
    journal_dir: Path | None = None


@dataclass(frozen=True)
class ServeConfig:
    store: ObjectStore
    task: Task
    deployments_file: Path | None = None
    # Without a file: one deployment, named after the task, in this mode.
    default_mode: str = "dark"
    teacher: TeacherSettings | None = None
    load: LoadSettings = field(default_factory=LoadSettings)
    poll_s: float = 30.0
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    limits: HttpLimits = field(default_factory=HttpLimits)
    log_calls: bool = True
    log_flush_s: float = 5.0
    writer_id: str | None = None


def build_service(config: ServeConfig) -> ServingService:
    task = config.task
    if config.deployments_file is not None:
        deployments = Deployments({}, config.deployments_file)
    else:
        deployments = Deployments({task.id: Deployment(mode=config.default_mode)})  # type: ignore[arg-type]
    for name in deployments.names():
        prompt_id = deployments.get(name).prompt_id  # type: ignore[union-attr]
        if prompt_id is not None and prompt_id not in task.prompts:
            raise UsageError(
                f"deployment {name!r} names the prompt {prompt_id!r}; the task's are {sorted(task.prompts)}"
            )
    metrics = ServeMetrics()

    def on_swap(old: str | None, loaded) -> None:
        metrics.swaps.labels("swapped").inc()
        metrics.serving(old, loaded.engine.train_id)

    watcher = ChampionWatcher(
        config.store,
        task.label,
        config.load,
        poll_s=config.poll_s,
        on_swap=on_swap,
        on_refuse=lambda refusal: metrics.swaps.labels("refused").inc(),
    )

    def on_batch(size: int, seconds: float) -> None:
        metrics.batch_size.observe(size)
        metrics.forward_seconds.observe(seconds)

    batcher = MicroBatcher(
        watcher.engine,
        max_batch=config.max_batch,
        max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
        on_batch=on_batch,
    )
    teacher = _teacher(config) if config.teacher is not None else None
    call_logger = feedback_logger = None
    if config.log_calls:
        call_logger = TeacherLogger(config.store, writer_id=config.writer_id, flush_interval_s=config.log_flush_s)
        feedback_logger = TeacherLogger(
            config.store,
            writer_id=config.writer_id,
            flush_interval_s=config.log_flush_s,
            object_key=feedback_object_key,
        )
    return ServingService(task, deployments, watcher, batcher, teacher, call_logger, feedback_logger, metrics)


def _teacher(config: ServeConfig) -> ServingTeacher:
    from distill_pipeline.teachers.client import ClientSettings, TeacherClient, TeacherSpec

    settings = config.teacher
    assert settings is not None
    if settings.prompt_id not in config.task.prompts:
        raise UsageError(
            f"the teacher prompt {settings.prompt_id!r} is not the task's; its prompts: {sorted(config.task.prompts)}"
        )
    client = TeacherClient(
        ClientSettings(
            api_base=settings.api_base,
            api_key=settings.api_key,
            rpm=settings.rpm,
            tpm=settings.tpm,
            max_concurrency=settings.max_concurrency,
            timeout_s=settings.timeout_s,
            max_retries=settings.max_retries,
            # A caller is waiting: a short backoff, and the deadline ends the call anyway.
            backoff_base_s=0.2,
            backoff_max_s=2.0,
            budget_usd=settings.budget_usd,
        ),
        ServingLedger.open(config.store, settings.journal_dir),
    )
    spec = TeacherSpec(settings.model, settings.prompt_id)
    # Imported here, before the first request: litellm takes seconds to import, which would
    # otherwise fall on the first caller and overrun its teacher deadline.
    import litellm

    litellm.suppress_debug_info = True
    client.check_priced(spec)
    return ServingTeacher(client, spec, deadline_s=settings.deadline_s, max_in_flight=settings.max_concurrency)


def serve(config: ServeConfig, host: str, port: int, *, log_level: str = "info") -> None:
    """Run the server until interrupted (SIGINT or SIGTERM), finishing the requests in flight."""
    import uvicorn

    service = build_service(config)
    app = create_app(service, config.limits)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
        # Our own admission control answers 503 with Retry-After first; this is the backstop.
        limit_concurrency=config.limits.max_in_flight * 2,
    )
