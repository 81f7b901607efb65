"""The teacher resource: which litellm models label the data, where they are, and within what limits.

Keys come from the environment through ``dg.EnvVar`` and never reach logs or metadata: an error
that quotes one is redacted before Dagster records it (``distill_pipeline/core/secrets.py``). A
model whose provider litellm knows (``anthropic/...``, ``vertex_ai/...``) may instead take its key
from that provider's usual variable, which litellm reads itself. Self-hosted servers (vLLM,
Ollama, a litellm proxy) are an ``api_base``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from distill_pipeline.core.secrets import errors_redacted
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.data.labels import LabelMode
from distill_pipeline.teachers.client import ClientSettings, Price, TeacherClient, TeacherSpec
from distill_pipeline.teachers.ledger import Ledger


def _kept(default: Any) -> Any:
    """A default that a launchpad config leaving the field out does not write over the configured value.

    Dagster fills a resource's config with the schema default of every field the run's config
    leaves out, and those replace the values the resource was configured with at load, so a
    launchpad config of ``max_retries`` alone turned ``relabel`` back into ``logged`` and dropped
    the key. A default from a factory is no schema default: the field stays out, and the value
    configured at load stays.
    """
    return Field(default_factory=lambda: default)


class TeacherPrice(dg.Config):
    """US dollars per million tokens, for a model litellm's price map does not know."""

    input_per_mtok: float
    output_per_mtok: float


class TeacherResource(dg.ConfigurableResource):
    """Teachers as litellm model strings, their prompt and sampling, the provider limits, the budget.

    A launchpad config changes the fields it sets and keeps the rest as configured at load (from
    the environment, see ``resources`` below): every default is ``_kept``.
    """

    mode: LabelMode = _kept("logged")
    """How ``teacher_labels`` labels a day: ``logged`` parses the logged responses; ``relabel`` asks the
    teachers for every row; ``fill`` asks them only where the logged response gave no label."""

    models: list[str] = Field(default_factory=list)
    """Teachers, e.g. ``["openai/gpt-4o"]``; several are majority-voted, ties going to the earlier one."""

    prompt_id: str = _kept("simple_prompt")
    """The task's prompt template the teachers get."""

    temperature: float = _kept(0.0)
    max_tokens: int = _kept(256)
    fallback_model: str | None = _kept(None)
    """Asked when a teacher still fails after its retries."""

    api_base: str | None = _kept(None)
    api_key: str | None = _kept(None)
    """Set with ``dg.EnvVar``; never logged. Read when a client is made: Dagster resolves the variable
    only when the run's config gives the field, and a launchpad config that leaves it out keeps the
    configured ``dg.EnvVar`` itself."""

    rpm: float | None = _kept(None)
    """The provider's requests-per-minute limit the client keeps to."""

    tpm: float | None = _kept(None)
    """The provider's tokens-per-minute limit the client keeps to."""

    max_concurrency: int = _kept(16)
    timeout_s: float = _kept(60.0)
    max_retries: int = _kept(8)
    budget_usd: float | None = _kept(None)
    """The most one materialisation may spend on new calls; it stops before going over."""

    prices: dict[str, TeacherPrice] = Field(default_factory=dict)
    """Prices of models litellm does not know, by model string."""

    batch: bool = _kept(False)
    """Relabel through the provider's batch API (OpenAI-style files + batches: about half the price,
    answers within a day); the run polls until the batch ends and resumes the same batch if restarted."""

    batch_poll_s: float = _kept(60.0)
    batch_timeout_s: float = _kept(26 * 3600.0)
    batch_discount: float = _kept(0.5)
    """Batch price as a share of the per-call price."""

    journal_dir: str | None = _kept(None)
    """Local journal of the ledger (``$DISTILL_LEDGER_JOURNAL``, else under the temp dir); on
    Kubernetes, a volume, so a killed pod's last answers are not paid for again."""

    def specs(self) -> list[TeacherSpec]:
        return [
            TeacherSpec(model, self.prompt_id, self.temperature, self.max_tokens, self.fallback_model)
            for model in self.models
        ]

    def settings(self, *, budget_usd: float | None = None) -> ClientSettings:
        return ClientSettings(
            api_base=self.api_base,
            api_key=self.api_key.get_value() if isinstance(self.api_key, dg.EnvVar) else self.api_key,
            rpm=self.rpm,
            tpm=self.tpm,
            max_concurrency=self.max_concurrency,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            budget_usd=self.budget_usd if budget_usd is None else budget_usd,
            prices={name: Price(p.input_per_mtok, p.output_per_mtok) for name, p in self.prices.items()},
        )

    @contextmanager
    def client(
        self, store: ObjectStore, context: dg.AssetExecutionContext, *, budget_usd: float | None = None
    ) -> Iterator[TeacherClient]:
        """A client over the store's ledger; the ledger is published when the block ends, even on error.

        An error raised in the block whose text holds a secret (a provider quoting the key) leaves
        it redacted, so the run's failure event and the compute log never show the key.
        """
        journal = Path(self.journal_dir).expanduser() if self.journal_dir else None
        ledger = Ledger.open(store, journal)
        try:
            with errors_redacted():
                yield TeacherClient(self.settings(budget_usd=budget_usd), ledger, progress=context.log.info)
        finally:
            ledger.close()


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


@dg.definitions
def resources() -> dg.Definitions:
    mode = os.environ.get("DISTILL_TEACHER_MODE", "logged")
    key = dg.EnvVar("DISTILL_TEACHER_API_KEY") if os.environ.get("DISTILL_TEACHER_API_KEY") else None
    return dg.Definitions(
        resources={
            "teacher": TeacherResource(
                mode=mode,  # type: ignore[arg-type]  # validated by the resource's config schema
                models=_env_list("DISTILL_TEACHERS"),
                api_base=os.environ.get("DISTILL_TEACHER_API_BASE"),
                api_key=key,
            )
        }
    )
