"""GPU placement of student steps, without a GPU: device claims with real flocks on fake device
ids, the trainer's command for several GPUs, what pods and tasks request, the steps in the GPU
pool, and one training run per train id."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import numpy as np
import pytest
from botocore.session import get_session
from botocore.validate import ParamValidator

from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.tables import read_manifest
from distill_pipeline.core.task import BASE_VARIANT, MonitoringConfig, load_task
from distill_pipeline.defs.monitoring import assets as monitoring_assets
from distill_pipeline.defs.students import assets as student_assets
from distill_pipeline.defs.students import launchers
from distill_pipeline.defs.students.resources import GPU_POOL, TrainerResource
from distill_pipeline.students import devices
from distill_pipeline.students.devices import (
    PlacementError,
    claim_gpus,
    command_processes,
    torch_device,
    training_command,
    training_run_lock,
)
from distill_pipeline.students.evaluation import Predictions
from distill_pipeline_tests.conftest import stop_process_group

FAST = {"poll_s": 0.005}


def _gpu_count(tags: dict[str, Any]) -> int:
    """GPUs a step's op tags ask a Kubernetes executor for (0 without the tag)."""
    config = tags.get("dagster-k8s/config")
    if config is None:
        return 0
    config = json.loads(config) if isinstance(config, str) else config
    resources = config["container_config"]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    return int(resources["requests"]["nvidia.com/gpu"])


def _ecs_gpu_count(tags: dict[str, Any]) -> int:
    overrides = tags.get("ecs/container_overrides")
    if overrides is None:
        return 0
    (requirement,) = json.loads(overrides)["resourceRequirements"]
    assert requirement["type"] == "GPU"
    return int(requirement["value"])


# ---- claiming devices


def test_a_step_gets_all_the_gpus_it_asks_for_or_none(tmp_path: Path) -> None:
    with claim_gpus([], 2, tmp_path) as none:
        assert none == []
    with pytest.raises(PlacementError, match="needs 3 GPUs; this host has 2"), claim_gpus(["0", "1"], 3, tmp_path):
        pass
    with pytest.raises(PlacementError), claim_gpus(["0"], 0, tmp_path):
        pass
    with claim_gpus(["0", "1", "2"], 2, tmp_path, **FAST) as pair:
        assert pair == ["0", "1"]
        with claim_gpus(["0", "1", "2"], 1, tmp_path, **FAST) as last:
            assert last == ["2"]
        # One device is free, two are asked for: the claim waits and takes nothing meanwhile.
        with pytest.raises(TimeoutError), claim_gpus(["0", "1", "2"], 2, tmp_path, timeout_s=0.05, **FAST):
            pass
        with claim_gpus(["0", "1", "2"], 1, tmp_path, timeout_s=1, **FAST) as again:
            assert again == ["2"]


def test_contending_multi_gpu_claims_never_overlap_and_never_deadlock(tmp_path: Path) -> None:
    """Steps of one and two GPUs hammer three devices: no device is ever held twice, every claim
    gets as many devices as it asked for, and every step finishes (a half-holding deadlock would
    time the claims out)."""
    gpus = ["0", "1", "2"]
    holders: dict[str, int] = {}
    guard = threading.Lock()
    errors: list[BaseException] = []
    claims: list[tuple[int, list[str]]] = []

    def step(index: int, count: int) -> None:
        rng = random.Random(index)
        try:
            for _ in range(6):
                with claim_gpus(gpus, count, tmp_path, timeout_s=30, poll_s=0.002) as held:
                    with guard:
                        claims.append((count, held))
                        for device in held:
                            assert device not in holders, f"GPU {device} held by {holders[device]} and {index}"
                            holders[device] = index
                    time.sleep(rng.uniform(0.0, 0.004))
                    with guard:
                        for device in held:
                            del holders[device]
        except BaseException as exc:  # handed to the main thread, which fails the test with it
            errors.append(exc)

    threads = [threading.Thread(target=step, args=(i, 2 if i % 2 else 1)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a claim never finished: deadlock"
    assert not errors, errors[0]
    assert len(claims) == 8 * 6
    assert all(len(held) == count and len(set(held)) == count for count, held in claims)


def test_a_waiting_multi_gpu_claim_is_not_overtaken_by_smaller_ones(tmp_path: Path) -> None:
    """The head of the queue collects devices as they come free; a one-GPU step that arrives
    later waits behind it instead of taking each freed device first (which would starve it)."""
    gpus = ["0", "1"]
    order: list[str] = []
    first = claim_gpus(gpus, 1, tmp_path, **FAST)
    assert first.__enter__() == ["0"]

    def claim(name: str, count: int) -> None:
        with claim_gpus(gpus, count, tmp_path, timeout_s=10, **FAST):
            order.append(name)
            time.sleep(0.05)

    pair = threading.Thread(target=claim, args=("pair", 2))
    pair.start()
    time.sleep(0.1)
    single = threading.Thread(target=claim, args=("single", 1))
    single.start()
    time.sleep(0.1)
    # GPU 1 is free, but the pair is ahead in the queue: nobody has started.
    assert order == []
    first.__exit__(None, None, None)
    pair.join(timeout=10)
    single.join(timeout=10)
    assert order == ["pair", "single"]


def test_a_claim_held_by_another_process_blocks_until_that_process_dies(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from distill_pipeline.students.devices import claim_gpus\n"
            "with claim_gpus(['0'], 1, Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        with pytest.raises(TimeoutError), claim_gpus(["0"], 1, tmp_path, timeout_s=0.05, **FAST):
            pass
    finally:
        # A killed step's locks go with its process: nobody has to clean up after it.
        stop_process_group(holder, grace_s=0.1)
    with claim_gpus(["0"], 1, tmp_path, timeout_s=5, **FAST) as held:
        assert held == ["0"]


def test_locks_name_a_gpu_by_its_pci_address_under_the_hosts_boot_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = tmp_path / "gpus"
    for address in ("0000:af:00.0", "0000:3b:00.0"):
        (driver / address).mkdir(parents=True)
    monkeypatch.setattr(devices, "NVIDIA_PROC_DIR", driver)
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("4b1c-boot\n")
    monkeypatch.setattr(devices, "BOOT_ID_FILE", boot_id)
    lock_dir = devices.host_lock_dir(tmp_path / "work")
    assert lock_dir == tmp_path / "work" / "gpu-locks" / "4b1c-boot"
    # Index 1 in PCI bus order is the second address, whatever order the driver lists them in.
    with claim_gpus(["1"], 1, lock_dir):
        assert (lock_dir / "gpu-0000_af_00.0.lock").is_file()


def test_a_claimed_gpu_is_addressed_by_its_place_among_the_processes_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert torch_device(None) == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert torch_device("3") == "cuda:1"
    with pytest.raises(PlacementError, match="not among"):
        torch_device("0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert torch_device("1") == "cuda:1"
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_the_trainer_resource_pins_inference_to_one_held_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    trainer = TrainerResource(work_dir=str(tmp_path), gpu_wait_timeout_s=0.05)
    lines: list[str] = []
    with trainer.inference_device(lines.append) as first, trainer.inference_device(lines.append) as second:
        assert (first, second) == ("cuda:0", "cuda:1")
        with pytest.raises(TimeoutError), trainer.inference_device(lines.append):
            pass
    assert "predicting on GPU 4, held for this step" in lines
    assert any(line.startswith("waiting for 1 of the GPUs 4, 5") for line in lines)
    with TrainerResource(work_dir=str(tmp_path), gpu_devices=[]).inference_device(lines.append) as cpu:
        assert cpu == "cpu"


# ---- launching on several GPUs


def test_several_gpus_train_under_torchrun_and_one_in_a_plain_process() -> None:
    many = training_command("run/train_spec.json", 4, python="/venv/bin/python")
    assert many == [
        "/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
        "distill_pipeline.trainer.train",
        "--spec",
        "run/train_spec.json",
    ]
    one = training_command("s.json", 1, python="python")
    assert one == ["python", "-m", "distill_pipeline.trainer.train", "--spec", "s.json"]
    assert (command_processes(many), command_processes(one)) == (4, 1)
    # The torchrun the step starts is the one of its own interpreter.
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(many[3:])
    assert (parsed.nproc_per_node, parsed.standalone, parsed.module) == ("4", True, True)
    assert parsed.training_script == "distill_pipeline.trainer.train"


def test_pods_and_tasks_request_as_many_gpus_as_the_command_starts_processes() -> None:
    command = training_command("/var/lib/distill/work/s.json", 2)
    pod = launchers.TrainerPodClient(image="trainer:1", work_dir="/var/lib/distill/work", work_claim="work")
    resources = pod.pod_spec(command_processes(command))["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "2"
    assert resources["requests"]["memory"] == "48Gi"
    task = launchers.TrainerTaskClient(
        cluster="distill",
        task_definition="distill-pipeline-trainer",
        work_dir="/var/lib/distill/work",
        subnets=["subnet-1"],
        security_groups=["sg-1"],
        capacity_provider="gpu",
    )
    params = task.run_task_params(command, {"CUDA_VISIBLE_DEVICES": ""})
    report = ParamValidator().validate(
        params, get_session().get_service_model("ecs").operation_model("RunTask").input_shape
    )
    assert not report.has_errors(), report.generate_report()
    (override,) = params["overrides"]["containerOverrides"]
    assert override["resourceRequirements"] == [{"type": "GPU", "value": "2"}]
    assert override["command"][:3] == ["python", "-m", "torch.distributed.run"]


@pytest.mark.parametrize("deployment", ["local", "k8s", "ecs"])
@pytest.mark.parametrize("gpus", [1, 2])
def test_a_training_steps_gpus_are_requested_exactly_once(deployment: str, gpus: int) -> None:
    """Under a step-level executor the step's own pod asks for the GPUs only when it trains in
    itself; with a pod or task client the trainer's pod or task asks, and the step asks none."""
    step_tags = launchers.training_op_tags(deployment, gpus)
    step = _gpu_count(step_tags)
    assert step == _ecs_gpu_count(step_tags)
    trainer_side = 0
    if deployment == "k8s":
        pod = launchers.TrainerPodClient(image="trainer:1", work_dir="/w", work_claim="w")
        trainer_side = int(pod.pod_spec(gpus)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    elif deployment == "ecs":
        task = launchers.TrainerTaskClient(
            cluster="c", task_definition="t", work_dir="/w", subnets=["s"], security_groups=["g"]
        )
        params = task.run_task_params(training_command("/w/s.json", gpus), {})
        trainer_side = int(params["overrides"]["containerOverrides"][0]["resourceRequirements"][0]["value"])
    assert sorted([step, trainer_side]) == [0, gpus]


def test_gpus_per_step_is_a_checked_deployment_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(launchers.GPUS_PER_STEP_ENV, raising=False)
    assert launchers.gpus_per_step() == 1
    monkeypatch.setenv(launchers.GPUS_PER_STEP_ENV, "2")
    assert launchers.gpus_per_step() == 2
    assert _gpu_count(launchers.training_op_tags("local")) == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(launchers.GPUS_PER_STEP_ENV, bad)
        with pytest.raises(dg.DagsterInvariantViolationError, match=launchers.GPUS_PER_STEP_ENV):
            launchers.gpus_per_step()
    monkeypatch.setenv(launchers.DEPLOYMENT_ENV, "slurm")
    with pytest.raises(dg.DagsterInvariantViolationError, match="expected one of"):
        launchers.training_op_tags()


# ---- the steps that use a GPU


@pytest.mark.parametrize(
    "asset",
    [student_assets.lora_adapter, student_assets.eval_report, student_assets.champion, monitoring_assets.drift_report],
    ids=lambda a: a.key.to_user_string(),
)
def test_every_step_running_a_student_is_in_the_gpu_pool_and_holds_a_device(asset: dg.AssetsDefinition) -> None:
    node = asset.op
    assert node.pool == GPU_POOL
    assert "trainer" in node.required_resource_keys
    expected = 1 if asset is not student_assets.lora_adapter else TrainerResource().gpus_per_step
    assert _gpu_count(dict(node.tags)) == _ecs_gpu_count(dict(node.tags)) == expected


def test_the_shadow_evaluation_loads_the_champion_on_the_gpu_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    trainer = TrainerResource(work_dir=str(tmp_path / "work"), gpu_wait_timeout_s=0.05)
    seen: dict[str, Any] = {}

    def fake_load(adapter_dir: Path, *, device: str, log: Any) -> str:
        seen["device"] = device
        # While the student is loaded its GPU is held: another step cannot take it.
        with pytest.raises(TimeoutError), claim_gpus(["6"], 1, devices.host_lock_dir(trainer.root()), timeout_s=0.01):
            pass
        return "student"

    def fake_predictor(student: str) -> Any:
        return lambda texts: Predictions([1 for _ in texts], np.full((len(texts), 2), 0.5), (0, 1))

    monkeypatch.setattr(monitoring_assets, "fetch_adapter", lambda store, prefix, directory: directory)
    monkeypatch.setattr(monitoring_assets, "load_adapter_student", fake_load)
    monkeypatch.setattr(monitoring_assets, "student_predictor", fake_predictor)
    current = {"input": ["a", "b", "c", "d"], "label": [1, 1, 0, 1]}
    shadow = monitoring_assets._shadow_evaluation(
        dg.build_asset_context(),
        LocalStore(tmp_path / "store"),
        trainer,
        {"adapter_prefix": "x/", "train_id": "t1", "metrics": {}},
        current,
        MonitoringConfig(),
        seed=1,
        scratch=tmp_path,
    )
    assert seen["device"] == "cuda:0"
    assert shadow.rows == 4 and shadow.agreement == pytest.approx(0.75)
    # Released once the evaluation is done.
    with claim_gpus(["6"], 1, devices.host_lock_dir(trainer.root()), timeout_s=0.5, poll_s=0.005) as held:
        assert held == ["6"]


# ---- one training run per train id


class _FakeTrainSets:
    """The training-set accessor as the training step uses it."""

    def manifest(self, size: str) -> dict[str, Any]:
        return {"files": {"train.parquet": {"sha256": "0" * 64}}, "test_sets_version": 1}

    def train(self, size: str, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "train.parquet").write_bytes(b"rows")
        return directory / "train.parquet"


class _Finished:
    def get_materialize_result(self) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"steps": 3, "output_dir": "/local"})


class _RecordingTrainer(dg.PipesSubprocessClient):
    """Stands in for the trainer's subprocess on this host: notes what it was given and found in
    its run folder, then leaves a finished run there as the trainer does."""

    def __init__(self, seconds: float = 0.2) -> None:
        super().__init__()
        self.seconds = seconds
        self.calls: list[dict[str, Any]] = []
        self.inside = 0
        self.most_inside = 0
        self.guard = threading.Lock()

    def run(self, *, context: Any, command: list[str], env: dict[str, str], extras: Any = None) -> _Finished:  # type: ignore[override]
        spec = json.loads(Path(command[command.index("--spec") + 1]).read_text())
        run_dir = Path(spec["output_dir"])
        with self.guard:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.calls.append(
            {"command": command, "env": env, "resumed_from": sorted(p.name for p in run_dir.glob("checkpoint-*"))}
        )
        time.sleep(self.seconds)
        (run_dir / "adapter").mkdir(parents=True, exist_ok=True)
        (run_dir / "adapter" / "adapter_config.json").write_text("{}")
        (run_dir / "adapter" / "student.json").write_text("{}")
        (run_dir / "result.json").write_text("{}")
        with self.guard:
            self.inside -= 1
        return _Finished()


def _train(
    store: LocalStore, trainer: TrainerResource, client: dg.PipesClient, log: list[str]
) -> dict[str, Any] | None:
    # What the step uses of its context: its log.
    context = SimpleNamespace(log=SimpleNamespace(info=log.append, warning=log.append))
    return student_assets._train_and_publish(  # type: ignore[arg-type]
        context=context,
        store=store,
        loaded=load_task(),
        trainer=trainer,
        client=client,
        size="50pct",
        variant=BASE_VARIANT,
        train="t0",
        prefix="students/adapters/size=50pct/t0/",
        train_sets_table=_FakeTrainSets(),
    )


def test_concurrent_runs_of_one_train_id_train_once_and_the_second_reuses_the_result(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    trainer = TrainerResource(work_dir=str(tmp_path / "work"), gpu_devices=[])
    client = _RecordingTrainer()
    results: list[dict[str, Any] | None] = []
    logs: list[list[str]] = [[], []]
    threads = [
        threading.Thread(target=lambda i=i: results.append(_train(store, trainer, client, logs[i]))) for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(client.calls) == 1 and client.most_inside == 1
    # One published and reported; the other waited, then found the result (None: reuse it).
    assert sorted(results, key=lambda r: r is None) == [{"steps": 3}, None]
    assert any("another run is training 50pct-t0" in line for line in logs[0] + logs[1])
    assert read_manifest(store, "students/adapters/size=50pct/t0/") is not None
    # Published: the run folder is gone, removed under the lock by the run that used it.
    assert not (tmp_path / "work" / "50pct-t0").exists()
    assert client.calls[0]["command"][1:3] == ["-m", "distill_pipeline.trainer.train"]
    assert client.calls[0]["env"]["CUDA_VISIBLE_DEVICES"] == ""


def test_a_run_after_one_that_died_resumes_from_its_checkpoints(tmp_path: Path) -> None:
    work = tmp_path / "work"
    # A run that was killed mid-training leaves its folder and checkpoint; its lock died with it.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from distill_pipeline.students.devices import training_run_lock\n"
            "with training_run_lock(Path(sys.argv[1]), '50pct-t0', timeout_s=5):\n"
            "    (Path(sys.argv[1]) / '50pct-t0' / 'run' / 'checkpoint-40').mkdir(parents=True)\n"
            "    print('training', flush=True); time.sleep(120)",
            str(work),
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"training"
        with pytest.raises(TimeoutError), training_run_lock(work, "50pct-t0", timeout_s=0.05, poll_s=0.005):
            pass
    finally:
        stop_process_group(holder, grace_s=0.1)
    client = _RecordingTrainer(seconds=0.0)
    reported = _train(LocalStore(tmp_path / "store"), TrainerResource(work_dir=str(work), gpu_devices=[]), client, [])
    assert reported == {"steps": 3}
    assert client.calls[0]["resumed_from"] == ["checkpoint-40"]


def test_a_multi_gpu_training_step_claims_its_gpus_and_runs_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    trainer = TrainerResource(work_dir=str(tmp_path / "work"), gpus_per_step=2)
    client = _RecordingTrainer(seconds=0.0)
    assert _train(LocalStore(tmp_path / "store"), trainer, client, []) == {"steps": 3}
    (call,) = client.calls
    assert command_processes(call["command"]) == 2 and "torch.distributed.run" in call["command"]
    assert call["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    too_many = TrainerResource(work_dir=str(tmp_path / "work"), gpus_per_step=4)
    with pytest.raises(PlacementError, match="needs 4 GPUs; this host has 3"):
        _train(LocalStore(tmp_path / "store2"), too_many, _RecordingTrainer(), [])
