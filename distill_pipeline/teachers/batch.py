"""Large relabelling jobs through a provider's batch endpoints: OpenAI-style files and batches.

A batch costs about half of the same calls made one by one and answers within a day rather than
at once. ``BatchLabeller.label`` answers what the ledger already holds, writes the rest as one
JSONL file of chat requests (each ``custom_id`` is the request's ledger key), uploads it with
``litellm.acreate_file``, starts it with ``litellm.acreate_batch``, polls
``litellm.aretrieve_batch`` and reads the answers with ``litellm.afile_content`` into the
ledger, priced at the batch discount.

Resumable: the job's state (its input file, its batch id, its status) is written to the store
(``ledger/batches/<job>.json``) before and after each step that creates something at the
provider. A job is named by the hash of its requests, so a killed run that starts again with the
same inputs finds its job and polls the batch it already started, never paying for a second
one; a run killed between creating the batch and recording its id finds it by the job name in
the batch's metadata.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from distill_pipeline.core.layout import LEDGER_ROOT
from distill_pipeline.core.secrets import redact
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.tables import read_pointer
from distill_pipeline.core.task import PromptTemplate
from distill_pipeline.teachers.client import (
    Answer,
    BudgetExceeded,
    TeacherClient,
    TeacherConfigError,
    TeacherSpec,
    estimate_tokens,
    render_messages,
)
from distill_pipeline.teachers.ledger import LedgerEntry, input_sha256, utc_now

BATCH_STATES = f"{LEDGER_ROOT}batches/"
#: Providers whose batch endpoints take OpenAI-style JSONL files through litellm.
BATCH_PROVIDERS = ("openai", "azure", "hosted_vllm", "litellm_proxy")
FINISHED = ("completed", "failed", "expired", "cancelled")
DEFAULT_DISCOUNT = 0.5


@dataclass
class BatchJob:
    """What the store remembers of one batch job, so that a new run picks it up where it stopped."""

    job_id: str
    model: str
    keys: list[str]
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str = "new"
    error: str | None = None
    created_at: str = field(default_factory=utc_now)

    @property
    def state_key(self) -> str:
        return f"{BATCH_STATES}{self.job_id}.json"


class BatchLabeller:
    """Labels through the batch endpoints; answers land in the client's ledger, like chat answers."""

    def __init__(
        self,
        client: TeacherClient,
        store: ObjectStore,
        *,
        poll_every_s: float = 30.0,
        timeout_s: float = 26 * 3600.0,
        discount: float = DEFAULT_DISCOUNT,
    ) -> None:
        self.client = client
        self.store = store
        self.poll_every_s = poll_every_s
        self.timeout_s = timeout_s
        self.discount = discount

    def label(self, spec: TeacherSpec, template: PromptTemplate, inputs: Sequence[str]) -> list[Answer]:
        return asyncio.run(self.alabel(spec, template, inputs))

    async def alabel(self, spec: TeacherSpec, template: PromptTemplate, inputs: Sequence[str]) -> list[Answer]:
        import litellm

        litellm.suppress_debug_info = True
        provider, _, bare_model = spec.model.partition("/")
        if provider not in BATCH_PROVIDERS or not bare_model:
            raise TeacherConfigError(
                f"{spec.model!r}: batch labelling needs an OpenAI-style batch API ({', '.join(BATCH_PROVIDERS)})"
            )
        self.client.check_priced(spec)
        ledger, totals = self.client.ledger, self.client.totals
        keys = self.client.keys_for(spec, template, inputs)
        todo = {key: text for key, text in zip(keys, inputs, strict=True) if key not in ledger}
        totals.inputs += len(inputs)
        totals.cache_hits += sum(1 for key in keys if key in ledger)
        errors: dict[str, str] = {}
        if todo:
            job = self._load(self._job_id(spec, sorted(todo))) or BatchJob(
                self._job_id(spec, sorted(todo)), spec.model, sorted(todo)
            )
            if job.status not in FINISHED:
                if job.batch_id is None:
                    self._check_budget(spec, template, todo)
                await self._run(job, spec, template, todo, provider, bare_model)
            errors = {key: job.error or f"batch {job.status}" for key in todo if key not in ledger}
        ledger.sync()
        answers = []
        for key in keys:
            entry = ledger.get(key)
            if entry is None:
                totals.failed += 1
                answers.append(Answer(key, None, errors.get(key, "no answer in the batch output"), False, None))
            else:
                answers.append(Answer(key, entry.response, None, key not in todo, entry.served_model))
        return answers

    # ------------------------------------------------------------------ state
    @staticmethod
    def _job_id(spec: TeacherSpec, keys: Sequence[str]) -> str:
        return hashlib.sha256(json.dumps([spec.model, *keys]).encode()).hexdigest()[:24]

    def _load(self, job_id: str) -> BatchJob | None:
        state = read_pointer(self.store, f"{BATCH_STATES}{job_id}.json")
        return None if state is None else BatchJob(**state)

    def _save(self, job: BatchJob) -> None:
        self.store.put_bytes(job.state_key, json.dumps(asdict(job), indent=1).encode())

    # ------------------------------------------------------------------ steps
    def _check_budget(self, spec: TeacherSpec, template: PromptTemplate, todo: dict[str, str]) -> None:
        budget = self.client.settings.budget_usd
        if budget is None:
            return
        price = self.client.price_of(spec.model)[0]
        assert price is not None  # check_priced ran
        estimate = self.discount * sum(
            price.cost(estimate_tokens(template.render(text), 0), spec.max_tokens) for text in todo.values()
        )
        if self.client.totals.cost_usd + estimate > budget:
            raise BudgetExceeded(
                f"teacher budget of ${budget:.4f} would be exceeded: a batch of {len(todo):,} requests may cost "
                f"${estimate:.4f} on top of ${self.client.totals.cost_usd:.4f} spent; nothing was submitted",
                self.client.totals,
            )

    def _auth(self, provider: str) -> dict[str, object]:
        settings = self.client.settings
        return {"custom_llm_provider": provider, "api_base": settings.api_base, "api_key": settings.api_key}

    async def _run(
        self,
        job: BatchJob,
        spec: TeacherSpec,
        template: PromptTemplate,
        todo: dict[str, str],
        provider: str,
        bare_model: str,
    ) -> None:
        import litellm

        auth = self._auth(provider)
        if job.batch_id is None and job.input_file_id is not None:
            # Killed between creating the batch and recording it: the batch carries the job's name.
            listed = await litellm.alist_batches(limit=100, **auth)
            for batch in getattr(listed, "data", None) or []:
                if (getattr(batch, "metadata", None) or {}).get("distill_job") == job.job_id:
                    job.batch_id, job.status = batch.id, "submitted"
                    self._save(job)
                    break
        if job.batch_id is None:
            lines = []
            for key in job.keys:
                body = {"model": bare_model, "messages": render_messages(template, todo[key])}
                body |= {name: value for name, value in spec.params.items() if value is not None}
                lines.append({"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body})
            data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
            uploaded = await litellm.acreate_file(file=(f"{job.job_id}.jsonl", data), purpose="batch", **auth)
            job.input_file_id, job.status = uploaded.id, "uploaded"
            self._save(job)
            batch = await litellm.acreate_batch(
                completion_window="24h",
                endpoint="/v1/chat/completions",
                input_file_id=uploaded.id,
                metadata={"distill_job": job.job_id},
                **auth,
            )
            job.batch_id, job.status = batch.id, "submitted"
            self._save(job)
            self.client.totals.calls += len(job.keys)
        await self._wait_and_collect(job, spec, template, todo, auth)

    async def _wait_and_collect(
        self, job: BatchJob, spec: TeacherSpec, template: PromptTemplate, todo: dict[str, str], auth: dict
    ) -> None:
        import litellm

        deadline = time.monotonic() + self.timeout_s
        while True:
            batch = await litellm.aretrieve_batch(batch_id=job.batch_id, **auth)
            if batch.status in FINISHED:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"batch {job.batch_id} still {batch.status} after {self.timeout_s:.0f} s; "
                    "run again to keep waiting for it (it will not be submitted twice)"
                )
            if self.client.progress is not None:
                self.client.progress(f"batch {job.batch_id}: {batch.status}, {batch.request_counts}")
            await asyncio.sleep(self.poll_every_s)
        # An expired or failed batch may still have answered part of its requests: keep those.
        if batch.output_file_id:
            content = await litellm.afile_content(file_id=batch.output_file_id, **auth)
            self._record(content.content, spec, template, todo)
        job.status = batch.status
        if batch.status != "completed":
            job.error = f"batch {job.batch_id} {batch.status}"
        self._save(job)

    def _record(self, output: bytes, spec: TeacherSpec, template: PromptTemplate, todo: dict[str, str]) -> None:
        ledger, totals = self.client.ledger, self.client.totals
        price, _ = self.client.price_of(spec.model)
        for line in output.decode("utf-8").splitlines():
            if not line.strip():
                continue
            result = json.loads(line)
            key = result.get("custom_id")
            response = result.get("response") or {}
            if key not in todo or key in ledger or response.get("status_code") != 200:
                continue
            body = response.get("body") or {}
            usage = body.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            cost = None if price is None else self.discount * price.cost(prompt_tokens, completion_tokens)
            ledger.record(
                LedgerEntry(
                    key=key,
                    model=spec.model,
                    served_model=spec.model,
                    prompt_id=template.id,
                    prompt_version=template.version,
                    params=spec.params,
                    input_sha256=input_sha256(todo[key]),
                    response=redact(body["choices"][0]["message"]["content"] or ""),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    cost_usd=cost,
                    priced_by=None if cost is None else "batch",
                    latency_ms=0.0,
                    created_at=utc_now(),
                    via="batch",
                )
            )
            totals.add_paid_call(prompt_tokens, completion_tokens, cost)
