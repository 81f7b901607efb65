"""`dagster dev` (webserver and daemon) on loopback for the tests, and its GraphQL API.

The server runs in its own process group with a temporary DAGSTER_HOME. A backgrounded
`dagster dev` ignores SIGINT, so it is stopped by PID: SIGTERM to its group and to every process
it started (run workers, the code server, trainer subprocesses), then SIGKILL for what remains.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import psutil

from distill_pipeline.core.task import BUILTIN_TASKS_DIR
from distill_pipeline.demo.main_job import prepare_dagster_home

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0
T = TypeVar("T")

RUNS_QUERY = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId status jobName tags { key value } } }
    ... on PythonError { message }
  }
}
"""

LOCATION_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def utc_days_back(*offsets: int) -> list[str]:
    today = dt.datetime.now(dt.UTC).date()
    return [(today - dt.timedelta(days=offset)).isoformat() for offset in offsets]


def write_tiny_task(folder: Path, *, sensor_interval_s: int = 5) -> Path:
    """The toxicity task for a few hundred rows a day: one training size, a few training steps."""
    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    text = (folder / "task.toml").read_text()
    replacements = {
        "in_distribution_test_size = 500": "in_distribution_test_size = 40",
        "balanced_test_size = 200": "balanced_test_size = 20",
        'train_sizes = ["5%", "10%", "25%", "50%", "75%", "100%"]': 'train_sizes = ["100%"]',
        "min_curated_rows = 100": "min_curated_rows = 50",
        "min_train_steps = 60": "min_train_steps = 6",
        "max_length_cap = 128": "max_length_cap = 32",
    }
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"the toxicity task no longer has {old!r}")
        text = text.replace(old, new)
    text += (
        "\n[monitoring]\n"
        f"sensor_interval_s = {sensor_interval_s}\n"
        'retrain_size = "100%"\n'
        "sample_rows = 200\nembedding_rows = 60\npermutations = 100\nmin_rows = 30\nshadow_rows = 60\n"
    )
    (folder / "task.toml").write_text(text)
    return folder


class DagsterDev:
    """A running `dagster dev` and its GraphQL endpoint."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        if answer.get("errors"):
            raise RuntimeError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def runs(self, tags: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Runs, newest first; each with its tags as a dict."""
        run_filter = {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}
        result = self.graphql(RUNS_QUERY, {"filter": run_filter})["runsOrError"]
        if result["__typename"] != "Runs":
            raise RuntimeError(f"runs query failed: {result}")
        return [{**run, "tags": {t["key"]: t["value"] for t in run["tags"]}} for run in result["results"]]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 2.0) -> T:
        """Poll ``probe`` until it returns something other than None (or False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
            value = probe()
            if value is not None and value is not False:
                return value
            time.sleep(every_s)
        raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{self.log_tail()}")

    def wait_for_run(self, tags: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
        """The newest run with ``tags`` once it has finished; fails if it did not succeed."""

        def finished() -> dict[str, Any] | None:
            runs = self.runs(tags)
            return runs[0] if runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None

        run = self.wait_for(f"a finished run tagged {dict(tags)}", finished, timeout_s)
        if run["status"] != "SUCCESS":
            raise AssertionError(f"run {run['runId']} ({dict(tags)}) ended {run['status']}:\n{self.log_tail()}")
        return run


def _stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    try:
        family = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        family = [process.pid]
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    for pid in family[1:]:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    for pid in family:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=grace_s)


@contextmanager
def running_dagster_dev(workdir: Path, env: Mapping[str, str]) -> Iterator[DagsterDev]:
    """`dagster dev` for this repository's workspace, with DAGSTER_HOME under ``workdir``."""
    home = prepare_dagster_home(str(workdir / "dagster_home"))
    port = free_port()
    log_path = workdir / "dagster-dev.log"
    full_env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "TOKENIZERS_PARALLELISM": "false",
        "NO_PROXY": "127.0.0.1,localhost",
        **env,
    }
    command = [
        str(Path(sys.executable).with_name("dagster")),
        "dev",
        "-w",
        str(REPO_ROOT / "workspace.yaml"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = DagsterDev(process, port, log_path)
    try:

        def location_loaded() -> bool | None:
            try:
                entries = server.graphql(LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
            except (urllib.error.URLError, ConnectionError, TimeoutError, RuntimeError):
                return None
            states = [e["locationOrLoadError"] for e in entries]
            if any(s and s["__typename"] == "PythonError" for s in states):
                raise RuntimeError(f"the code location failed to load: {states}")
            return (bool(states) and all(s and s["__typename"] == "RepositoryLocation" for s in states)) or None

        server.wait_for("the code location to load", location_loaded, START_TIMEOUT_S)
        yield server
    finally:
        _stop(process)
