"""Where the trainer runs in production: a GPU pod on Kubernetes, or a GPU task on ECS.

``DISTILL_DEPLOYMENT`` picks the Pipes client that ``lora_adapter`` launches the trainer with:

- ``local`` (the default): ``PipesSubprocessClient``, a subprocess of the run on its own host's GPU;
- ``k8s``: a pod from the trainer image requesting the step's NVIDIA GPUs, through ``dagster-k8s``'s
  ``PipesK8sClient`` (progress read from the pod's log);
- ``ecs``: a task of a GPU task definition, through ``dagster-aws``'s ``PipesECSClient`` (progress
  read from CloudWatch).

``DISTILL_GPUS_PER_STEP`` (default 1) is how many GPUs a training step uses: the default of the
``trainer`` resource's ``gpus_per_step``, and the count the op tags below request of a step-level
executor (``k8s_job_executor``, ``ecs_executor``). Exactly one thing asks a scheduler for a
training step's GPUs: the trainer's pod or task when a Pipes client above launches one (the step
itself then only follows it and requests none), else the step's own pod or task through its tags.
Every step that predicts with a student asks for one GPU the same way.

The step hands the trainer a spec file, the training table and a run folder under the work folder
(``DISTILL_WORK_DIR``), and publishes the adapter the trainer leaves there. So in ``k8s`` and
``ecs`` the run and the trainer mount one shared volume at that same path (a ReadWriteMany
claim; EFS); it also keeps the checkpoints a retried step resumes from. The clients below take
the call the step makes of a subprocess client (a command and an environment) and turn it into
a pod or a task; the rest of the Pipes session is Dagster's own.
"""

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from dagster_aws.pipes import PipesECSClient

from distill_pipeline.students.devices import command_processes

DEPLOYMENT_ENV = "DISTILL_DEPLOYMENT"
DEPLOYMENTS = ("local", "k8s", "ecs")
GPUS_PER_STEP_ENV = "DISTILL_GPUS_PER_STEP"


def k8s_gpu_config(gpus: int) -> dict[str, Any]:
    """``dagster-k8s/config`` of a pod with ``gpus`` NVIDIA GPUs, requested and limited, on a GPU
    node; CPU and memory grow with the GPUs (data loading and host copies of the weights)."""
    cpu, memory = str(4 * gpus), f"{24 * gpus}Gi"
    return {
        "container_config": {
            "resources": {
                "requests": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)},
                "limits": {"memory": memory, "nvidia.com/gpu": str(gpus)},
            }
        },
        "pod_spec_config": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


def gpu_op_tags(gpus: int) -> dict[str, Any]:
    """Op tags placing a step on ``gpus`` GPUs under a step-level executor: its pod under
    ``k8s_job_executor``, its task under ``ecs_executor``; other executors ignore them."""
    ecs = {"resourceRequirements": [{"type": "GPU", "value": str(gpus)}]}
    return {"dagster-k8s/config": k8s_gpu_config(gpus), "ecs/container_overrides": json.dumps(ecs)}


#: A one-GPU pod under `k8s_job_executor`.
K8S_GPU_OP_TAGS = {"dagster-k8s/config": k8s_gpu_config(1)}
#: Steps that predict with a student (evaluation, the champion's re-measure, the shadow evaluation).
INFERENCE_OP_TAGS = gpu_op_tags(1)


def deployment() -> str:
    """``DISTILL_DEPLOYMENT``, checked: a wrong value fails the code location's load."""
    chosen = os.environ.get(DEPLOYMENT_ENV, "").strip() or "local"
    if chosen not in DEPLOYMENTS:
        raise dg.DagsterInvariantViolationError(
            f"{DEPLOYMENT_ENV}={chosen!r}: expected one of {', '.join(DEPLOYMENTS)}"
        )
    return chosen


def gpus_per_step() -> int:
    """``DISTILL_GPUS_PER_STEP``, checked (a whole number from 1); 1 when unset."""
    raw = os.environ.get(GPUS_PER_STEP_ENV, "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise dg.DagsterInvariantViolationError(
            f"{GPUS_PER_STEP_ENV}={raw!r}: expected a whole number of GPUs, 1 or more"
        )
    return int(raw)


def training_op_tags(chosen_deployment: str | None = None, gpus: int | None = None) -> dict[str, Any]:
    """The op tags of a training step. With a pod or task client the trainer's pod or task holds
    the GPUs and the step only follows it, so the step requests none: tags asking for them too
    would make a step-level executor hold a second set of GPUs idle for the whole training."""
    if (chosen_deployment or deployment()) != "local":
        return {}
    return gpu_op_tags(gpus or gpus_per_step())


#: The trainer image's container in a pod and in the ECS task definition.
TRAINER_CONTAINER = "trainer"


def trainer_command(command: Sequence[str]) -> list[str]:
    """The step's command with the trainer image's interpreter: the launching process's
    ``sys.executable`` is a path in the user-code image, not in the trainer's."""
    return ["python", *command[1:]]


def trainer_env(env: Mapping[str, str] | None, work_dir: str) -> dict[str, str]:
    """The step's environment for a trainer that gets its own GPU.

    The step itself runs on a node without a GPU, so it asks to hide every GPU
    (``CUDA_VISIBLE_DEVICES=""``); the trainer's pod or task is given exactly one by its scheduler,
    which that setting would hide. Hub downloads are cached on the shared volume.
    """
    kept = {k: v for k, v in (env or {}).items() if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    return {"HF_HOME": f"{work_dir.rstrip('/')}/hf-cache", **kept}


class TrainerPodClient(dg.PipesClient):
    """Runs the trainer as a Kubernetes pod on a GPU node (``DISTILL_DEPLOYMENT=k8s``)."""

    def __init__(
        self,
        *,
        image: str,
        work_dir: str,
        work_claim: str,
        namespace: str | None = None,
        node_selector: Mapping[str, str] | None = None,
    ) -> None:
        self.image = image
        self.work_dir = work_dir
        self.work_claim = work_claim
        # None: the namespace of the pod the run is in.
        self.namespace = namespace
        self.node_selector = dict(node_selector or {})

    def pod_spec(self, gpus: int = 1) -> dict[str, Any]:
        """The trainer pod: the GPU request and toleration of :func:`k8s_gpu_config` for ``gpus``
        GPUs (one placement, defined once), and the shared work volume."""
        placement = k8s_gpu_config(gpus)
        spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": TRAINER_CONTAINER,
                    "resources": json.loads(json.dumps(placement["container_config"]["resources"])),
                    "volumeMounts": [{"name": "work", "mountPath": self.work_dir}],
                    "securityContext": {"allowPrivilegeEscalation": False},
                }
            ],
            # The user of both images, so the trainer and the run read each other's files.
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
            "tolerations": json.loads(json.dumps(placement["pod_spec_config"]["tolerations"])),
            "volumes": [{"name": "work", "persistentVolumeClaim": {"claimName": self.work_claim}}],
        }
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        return spec

    def run(  # type: ignore[override]
        self,
        *,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        # dagster-k8s comes with the deployment (the `deploy` extra), not with the package.
        from dagster_k8s import PipesK8sClient

        return PipesK8sClient().run(
            context=context,
            extras=extras,
            image=self.image,
            command=trainer_command(command),
            namespace=self.namespace,
            env=trainer_env(env, self.work_dir),
            # As many GPUs as the command starts trainer processes.
            base_pod_spec=self.pod_spec(command_processes(command)),
        )


class TrainerTaskClient(dg.PipesClient):
    """Runs the trainer as an ECS task of a GPU task definition (``DISTILL_DEPLOYMENT=ecs``).

    The task definition (docker/ecs/trainer-task-definition.json) holds what does not change per
    step: the trainer image, the GPU requirement, the EFS work volume and the CloudWatch log
    configuration Pipes reads progress from.
    """

    def __init__(
        self,
        *,
        cluster: str,
        task_definition: str,
        work_dir: str,
        subnets: Sequence[str],
        security_groups: Sequence[str],
        capacity_provider: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.task_definition = task_definition
        self.work_dir = work_dir
        self.subnets = list(subnets)
        self.security_groups = list(security_groups)
        # GPU instances come from an EC2 capacity provider (Fargate has no GPUs); None: the
        # cluster's default capacity provider strategy.
        self.capacity_provider = capacity_provider

    def run_task_params(self, command: Sequence[str], env: Mapping[str, str] | None) -> dict[str, Any]:
        """The ``ecs.run_task`` request for one training step (Pipes adds its own variables)."""
        params: dict[str, Any] = {
            "cluster": self.cluster,
            "taskDefinition": self.task_definition,
            "count": 1,
            "networkConfiguration": {
                "awsvpcConfiguration": {
                    "subnets": self.subnets,
                    "securityGroups": self.security_groups,
                    "assignPublicIp": "DISABLED",
                }
            },
            "overrides": {
                "containerOverrides": [
                    {
                        "name": TRAINER_CONTAINER,
                        "command": trainer_command(command),
                        # As many GPUs as the command starts trainer processes (the task
                        # definition's own requirement is one).
                        "resourceRequirements": [{"type": "GPU", "value": str(command_processes(command))}],
                        "environment": [
                            {"name": k, "value": v} for k, v in sorted(trainer_env(env, self.work_dir).items())
                        ],
                    }
                ]
            },
        }
        if self.capacity_provider:
            params["capacityProviderStrategy"] = [{"capacityProvider": self.capacity_provider, "weight": 1}]
        return params

    def run(  # type: ignore[override]
        self,
        *,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        return PipesECSClient().run(
            context=context,
            run_task_params=self.run_task_params(command, env),  # type: ignore[arg-type]
            extras=extras,
            pipes_container_name=TRAINER_CONTAINER,
        )


def _required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise dg.DagsterInvariantViolationError(
            f"{DEPLOYMENT_ENV}={os.environ.get(DEPLOYMENT_ENV)} needs {name} (see the README's Deployment section)"
        )
    return value


def _listed(name: str) -> list[str]:
    return [part.strip() for part in _required(name).split(",") if part.strip()]


def training_pipes_client() -> dg.PipesClient:
    """The Pipes client ``DISTILL_DEPLOYMENT`` asks for, configured from the environment.

    A missing setting fails the code location's load, not the first training step hours later.
    """
    chosen = deployment()
    if chosen == "local":
        return dg.PipesSubprocessClient()
    if chosen == "k8s":
        node_selector = os.environ.get("DISTILL_TRAINER_NODE_SELECTOR", "").strip()
        return TrainerPodClient(
            image=_required("DISTILL_TRAINER_IMAGE"),
            work_dir=_required("DISTILL_WORK_DIR"),
            work_claim=_required("DISTILL_WORK_CLAIM"),
            namespace=os.environ.get("DISTILL_TRAINER_NAMESPACE", "").strip() or None,
            node_selector=json.loads(node_selector) if node_selector else None,
        )
    return TrainerTaskClient(
        cluster=_required("DISTILL_ECS_CLUSTER"),
        task_definition=_required("DISTILL_TRAINER_TASK_DEFINITION"),
        work_dir=_required("DISTILL_WORK_DIR"),
        subnets=_listed("DISTILL_ECS_SUBNETS"),
        security_groups=_listed("DISTILL_ECS_SECURITY_GROUPS"),
        capacity_provider=os.environ.get("DISTILL_ECS_CAPACITY_PROVIDER", "").strip() or None,
    )
