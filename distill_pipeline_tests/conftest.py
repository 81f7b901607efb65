"""Shared fixtures: the two object stores (a temp directory, and S3 on a real moto server), and
the OpenAI-compatible teacher server.

The moto server is a separate process on loopback, started in its own process group and
stopped by PID, so the S3 tests exercise boto3's real HTTP path rather than an in-process mock;
the teacher server (``openai_server.py``) is started the same way, and litellm reaches it over
HTTP as it reaches OpenAI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill_pipeline.core.store import LocalStore, ObjectStore, S3Store, make_s3_client, open_store

# Tests never reach the network. DAGSTER_HOME is deliberately left alone: tests that need an
# instance make a temporary one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MOTO_START_TIMEOUT_S = 30.0

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


def _stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
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
            _stop_process_group(process)


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
