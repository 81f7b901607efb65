"""Who answers a call, per rollout mode: plain functions of the deployment, the user and the student.

- ``dark``: the teacher answers; the student runs beside it unseen (``shadow``).
- ``hybrid``: the student runs first; inside the band [lo, hi] of P(positive) it is unsure and the
  teacher answers (``deferred``), outside it the student answers (``student``).
- ``canary``: a sticky share of users, by a hash of the user id, get the student (``student``);
  the others get the teacher alone (``teacher``).
- ``full``: the student answers; a sample of calls, by a hash of the request id, is also sent to the
  teacher in the background for evaluation (``sample``).

Whenever the teacher was to answer the caller and failed, the student's answer is returned
(``fallback``). Hashes rather than random draws: a user stays in or out of a canary across calls,
replicas and restarts, and a replayed request is sampled the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from distill_pipeline.serving.deployments import Deployment


def unit_hash(*parts: str) -> float:
    """A number in [0, 1) fixed by ``parts``; uniform over distinct inputs."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_canary(deployment_name: str, deployment: Deployment, user_id: str) -> bool:
    # Keyed by deployment too, so that two canaries do not pick the same users.
    return unit_hash("canary", deployment_name, user_id) < deployment.canary_share


def sampled(deployment: Deployment, request_id: str) -> bool:
    return unit_hash("sample", request_id) < deployment.sample_rate


def unsure(deployment: Deployment, probabilities: Mapping[int, float], positive: int | None) -> bool:
    """Hybrid's band: P(positive) within [lo, hi]; for a task without a positive label, the top
    label's probability at most ``hi``."""
    lo, hi = deployment.band
    if positive is not None and positive in probabilities:
        return lo <= probabilities[positive] <= hi
    return max(probabilities.values()) <= hi


@dataclass(frozen=True)
class Plan:
    """What happens before the student answers: does the student run, and does the teacher answer."""

    student_runs: bool
    teacher_answers: bool


def plan(deployment_name: str, deployment: Deployment, user_id: str) -> Plan:
    """The first step of a call; hybrid decides the teacher's part after the student has answered."""
    if deployment.mode == "dark":
        return Plan(student_runs=True, teacher_answers=True)
    if deployment.mode == "canary":
        chosen = in_canary(deployment_name, deployment, user_id)
        return Plan(student_runs=chosen, teacher_answers=not chosen)
    return Plan(student_runs=True, teacher_answers=False)
