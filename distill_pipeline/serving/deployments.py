"""Deployments: what a request's ``model`` names, and how that deployment splits its traffic.

A deployment file (TOML or JSON) holds one table per deployment::

    [deployments.toxicity]
    mode = "hybrid"          # dark | hybrid | canary | full
    band = [0.2, 0.8]        # hybrid: P(positive) inside the band goes to the teacher
    canary_share = 0.1       # canary: the share of users (sticky by user id) the student answers
    sample_rate = 0.02       # full: the share of calls also sent to the teacher, for evaluation

It is re-read when it changes, so a mode changes without a restart; an admin endpoint can change
one deployment in memory too. A file that does not parse keeps the deployments it would replace.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill_pipeline.core.errors import UsageError
from distill_pipeline.logs.schema import ROLLOUT_MODES

log = logging.getLogger(__name__)

RolloutMode = Literal["dark", "hybrid", "canary", "full"]
assert set(RolloutMode.__args__) == set(ROLLOUT_MODES)  # type: ignore[attr-defined]


class Deployment(BaseModel):
    """One deployment's rollout; the teacher settings default to the server's."""

    model_config = ConfigDict(extra="forbid")

    mode: RolloutMode = "dark"
    band: tuple[float, float] = (0.2, 0.8)
    canary_share: float = Field(default=0.0, ge=0.0, le=1.0)
    sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # None: the server's teacher model and prompt.
    teacher_model: str | None = None
    prompt_id: str | None = None

    @model_validator(mode="after")
    def _band_in_order(self) -> Deployment:
        lo, hi = self.band
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"band must be [lo, hi] with 0 <= lo <= hi <= 1, got [{lo}, {hi}]")
        return self


class DeploymentFileError(UsageError):
    """The deployment file cannot be read or says something invalid; the message names the deployment."""


def parse_deployments(raw: dict[str, Any], source: str) -> dict[str, Deployment]:
    table = raw.get("deployments")
    if not isinstance(table, dict) or not table:
        raise DeploymentFileError(f"{source}: no [deployments.<name>] table")
    deployments = {}
    for name, settings in table.items():
        try:
            deployments[str(name)] = Deployment.model_validate(settings)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise DeploymentFileError(f"{source}: deployment {name!r}: {problems}") from None
    return deployments


def read_deployment_file(path: Path) -> dict[str, Deployment]:
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DeploymentFileError(f"{path}: cannot read the deployment file ({exc})") from None
    return parse_deployments(raw, str(path))


class Deployments:
    """The live deployments: from a file, re-read on change, or given once; changeable at run time."""

    def __init__(self, initial: dict[str, Deployment], path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._deployments = dict(initial)
        self._stamp: tuple[int, int] | None = None
        self.reload_errors = 0
        self.last_error: str | None = None
        if path is not None:
            self._deployments = read_deployment_file(path)
            self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)  # type: ignore[arg-type]
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when the deployments changed. A bad file keeps the old ones."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            fresh = read_deployment_file(self.path)
        except DeploymentFileError as exc:
            self._stamp = stamp
            self.reload_errors += 1
            self.last_error = str(exc)
            log.error("kept the deployments in use: %s", exc)
            return False
        with self._lock:
            self._stamp = stamp
            self._deployments = fresh
            self.last_error = None
        log.info("deployments re-read from %s: %s", self.path, self.describe())
        return True

    def get(self, name: str) -> Deployment | None:
        with self._lock:
            return self._deployments.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._deployments)

    def put(self, name: str, deployment: Deployment) -> None:
        """Change (or add) one deployment until the file next changes."""
        with self._lock:
            self._deployments[name] = deployment
        log.info("deployment %s set to %s", name, deployment.model_dump())

    def describe(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: d.model_dump() for name, d in sorted(self._deployments.items())}
