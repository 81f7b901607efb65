"""Shared fixtures: the two object stores (a temp directory, and S3 on a real moto server), and
the OpenAI-compatible teacher server.

The moto server is a separate process on loopback, started in its own process group and
stopped by PID, so the S3 tests exercise boto3's real HTTP path rather than an in-process mock;
the teacher server (``openai_server.py``) is started the same way, and litellm reaches it over
HTTP as it reaches OpenAI. ``running_student_server`` starts ``distill-pipeline serve`` the same
way, with that server as its teacher; ``tiny_student_spec``, ``train_tiny_student`` and
``publish_frozen_test_set`` are how the serving tests train and publish the tiny champion it serves.

Also here: where the real data shared beside the checkout is found (one place, one variable), and
the skip policy: under ``CI=true`` a skipped test fails the run unless its reason is on
``SKIP_ALLOWLIST``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from distill_pipeline.core.store import LocalStore, ObjectStore, S3Store, make_s3_client, open_store

if TYPE_CHECKING:
    from distill_pipeline.trainer.spec import TrainSpec

# Tests never reach the network. DAGSTER_HOME is deliberately left alone: tests that need an
# instance make a temporary one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MOTO_START_TIMEOUT_S = 30.0
STUDENT_SERVER_START_TIMEOUT_S = 120.0

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- the shared real data ----------------------------------------------------------------------

SHARED_DATA_ENV = "DISTILL_SHARED_DATA"


def shared_data_dir() -> Path:
    """The folder of real data shared between checkouts (it holds ``jigsaw/``).

    ``$DISTILL_SHARED_DATA`` when set, else ``shared/data`` in the folder that holds the checkout
    (where CI lays it). Tests and benchmarks read it in place and never copy it into the repository.
    """
    configured = os.environ.get(SHARED_DATA_ENV)
    return Path(configured).expanduser().resolve() if configured else REPO_ROOT.parent / "shared" / "data"


SHARED_JIGSAW = shared_data_dir() / "jigsaw"
JIGSAW_TEACHER_RESPONSES = SHARED_JIGSAW / "teacher_responses.parquet"
requires_shared_jigsaw = pytest.mark.skipif(
    not JIGSAW_TEACHER_RESPONSES.is_file(),
    reason=f"the shared Jigsaw data is not at {SHARED_JIGSAW} (set {SHARED_DATA_ENV} to the folder holding jigsaw/)",
)

# --- the skip policy ---------------------------------------------------------------------------

GPU_SKIP_REASON = "needs a CUDA GPU: a `gpu` test, run in the device check on a GPU machine"

# The only skips CI accepts: a regular expression searched in the skip's reason or the test's node
# id -> why that skip is legitimate. A missing tool or data set is never here: `make test`
# installs chromium, chromium-driver, docker-compose and hadolint, and CI lays shared/ beside the
# checkout, so under CI the tests that need them must run.
SKIP_ALLOWLIST: dict[str, str] = {
    re.escape(GPU_SKIP_REASON): "CI's machines have no GPU; `gpu` tests run where one is lent (the device check)",
}


def running_under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The reason a skipped report gives, as ``-rs`` prints it."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return "" if reason == "Skipped" else reason.removeprefix("Skipped: ")


def allowed_skip(nodeid: str, reason: str) -> str | None:
    """Why this skip is allowed under CI, or None when it is not."""
    for pattern, why in SKIP_ALLOWLIST.items():
        if re.search(pattern, reason) or re.search(pattern, nodeid):
            return why
    return None


class SkipPolicy:
    """Records every skip that is not on the allowlist, lists them, and fails the session for them."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str]] = []

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = skip_reason(report)
            if allowed_skip(report.nodeid, reason) is None:
                self.refused.append((report.nodeid, reason))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.refused and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.refused:
            return
        terminalreporter.section("skips not allowed under CI", sep="=", red=True, bold=True)
        for nodeid, reason in self.refused:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)
        terminalreporter.line(
            f"{len(self.refused)} skip(s) above fail this CI run: under CI=true a test may skip only for a reason"
            " on SKIP_ALLOWLIST in distill_pipeline_tests/conftest.py. Install what the test needs (`make test`"
            " does), or, if it needs a GPU, mark it `@pytest.mark.gpu`."
        )


def pytest_configure(config: pytest.Config) -> None:
    if running_under_ci():
        config.pluginmanager.register(SkipPolicy(), "distill-skip-policy")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_tests and not cuda_available():  # torch is imported only when a `gpu` test is collected
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))


_DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


def _wait_until_answers(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer at {url} within {MOTO_START_TIMEOUT_S}s:\n{log_path.read_text()}")


def tiny_student_spec(folder: Path, base_model: Path, output_dir: Path, **overrides: Any) -> TrainSpec:
    """How the serving tests train their tiny student: ``folder`` holds ``train.parquet`` and
    ``validation.parquet`` of ``input`` / ``label`` (0 ok, 1 toxic); a LoRA adapter on every
    attention and dense layer of ``base_model``, on the CPU, with no checkpoints. ``overrides``
    change any field (more epochs make a stronger student)."""
    from distill_pipeline.trainer.spec import TrainSpec

    settings: dict[str, Any] = {
        "train_path": str(folder / "train.parquet"),
        "validation_path": str(folder / "validation.parquet"),
        "base_model": str(base_model),
        "label_values": [0, 1],
        "label_names": ["ok", "toxic"],
        "positive_label": 1,
        "epochs": 4,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "lora_dropout": 0.0,
        "target_modules": ["query", "key", "value", "dense"],
        "max_length_cap": 32,
        "eval_every_steps": None,
        "checkpoint_every_steps": None,
        "output_dir": str(output_dir),
        "device": "cpu",
    }
    return TrainSpec(**{**settings, **overrides})


def train_tiny_student(spec: TrainSpec) -> None:
    """Train ``spec`` in this process on one CPU thread: a model this small gains nothing from more,
    and threads contending for two shared cores made its training twenty times slower."""
    import torch

    from distill_pipeline.trainer.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(spec, log=lambda _m: None)
    finally:
        torch.set_num_threads(threads)


def publish_frozen_test_set(store: ObjectStore, rows: list[dict[str, Any]], folder: Path) -> None:
    """``rows`` as version 1 of the frozen test sets (its ``in_distribution`` set), made current."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill_pipeline.core.layout import TEST_SETS_CURRENT, test_sets_prefix
    from distill_pipeline.core.tables import publish_table

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "in_distribution.parquet")
    publish_table(store, test_sets_prefix(1), {"in_distribution.parquet": folder / "in_distribution.parquet"}, {})
    store.put_bytes(TEST_SETS_CURRENT, json.dumps({"version": 1, "prefix": test_sets_prefix(1)}).encode())


@contextmanager
def running_student_server(
    store_root: Path,
    teacher_url: str,
    folder: Path,
    *,
    serve_args: Sequence[str] = (),
    global_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    entry: Sequence[str] = ("-m", "distill_pipeline.cli"),
) -> Iterator[str]:
    """``distill-pipeline serve`` on loopback, with the test server (``teacher_url``) as its teacher.

    Started in its own process group from the repository root, its output in ``folder/server.log``
    and its ledger journal in ``folder/journal``; yields its base URL once ``/readyz`` answers 200
    (a champion loaded and smoke-tested), and stops it by PID, printing the log's tail. ``entry``
    is what follows the interpreter on the command line (the module by default).
    """
    import httpx

    port = _free_port()
    environment = {
        **os.environ,
        "DISTILL_TEACHER_API_KEY": "sk-test",
        "DISTILL_LEDGER_JOURNAL": str(folder / "journal"),
        "HF_HUB_OFFLINE": "1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        **(env or {}),
    }
    command = [sys.executable, *entry, "--store", str(store_root), *global_args, "serve", "--port", str(port),
               "--teacher", "openai/gpt-4", "--teacher-api-base", teacher_url + "/v1", *serve_args]  # fmt: skip
    log_path = folder / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STUDENT_SERVER_START_TIMEOUT_S
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield url
    finally:
        stop_process_group(process, grace_s=30)
        print(log_path.read_text()[-4000:])


@pytest.fixture(scope="session")
def moto_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server on loopback, with dummy AWS credentials in the env."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in _DUMMY_AWS_ENV.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log_path = tmp_path_factory.mktemp("moto") / "server.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_until_answers(endpoint, process, log_path)
            yield endpoint
        finally:
            stop_process_group(process)


@pytest.fixture
def s3_store(moto_s3_server: str) -> S3Store:
    """A store on a fresh bucket of the moto server, under a key prefix."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    make_s3_client(moto_s3_server).create_bucket(Bucket=bucket)
    store = open_store(f"s3://{bucket}/some/prefix", endpoint_url=moto_s3_server)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each store in turn, for tests of behaviour both must share."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="session")
def teacher_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of the project's OpenAI-compatible test server on loopback."""
    from distill_pipeline_tests.openai_server import running_server

    with running_server(tmp_path_factory.mktemp("teacher-server") / "server.log") as url:
        yield url


@pytest.fixture
def teacher_url(teacher_server: str) -> str:
    """The teacher server, reset to no faults and no history."""
    from distill_pipeline_tests.openai_server import control

    control(teacher_server, reset=True)
    return teacher_server
