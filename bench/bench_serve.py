"""The student server on loopback: speed against the teacher path, and hybrid's cost/quality curve.

Speed (same run, same machine): throughput and p50/p99 latency of ``/v1/classify`` and
``/v1/chat/completions`` at concurrency 1, 8 and 64, for

- the student through ``distill-pipeline serve`` (full rollout), with micro-batching, and the same
  server with ``--max-batch 1`` (one forward pass per request: the stock way to put a model behind
  an endpoint, the baseline of the batching);
- the teacher path: the project's OpenAI-compatible test server as the teacher at a fixed
  ``--teacher-latency-ms`` (default 500, inside the 300-800 ms GPT-4 answers take), called
  directly and through this server in dark rollout (teacher answers, student shadows). Every
  teacher request is a distinct Jigsaw comment, so the ledger answers none of them.

Quality and cost, computed offline (labelled so in the output) from the champion's probabilities
on its frozen test rows and the real GPT-4 answers logged for them (the test labels), scored
against the human labels of the shared Jigsaw data: hybrid's accuracy with a 95% bootstrap
interval and the share of calls sent to the teacher as the band around the student's decision
threshold widens, with GPT-4's price per 1,000 calls from the teacher client's price table
(litellm's price map for ``gpt-4-1106-preview``, at the logged answers' token counts).

    python bench/bench_quality.py --sizes 100% --keep out/      # trains the champion
    python bench/bench_serve.py --store out/store
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import pyarrow.parquet as pq

from distill_pipeline.core.published import Champion, TestSets
from distill_pipeline.core.reporting import markdown_table
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import load_task
from distill_pipeline.students.statistics import bootstrap_interval
from distill_pipeline_tests.conftest import JIGSAW_TEACHER_RESPONSES
from distill_pipeline_tests.openai_server import running_server

GPT4 = "gpt-4-1106-preview"
#: The on-demand price of the machine a student replica needs (2 vCPU, 4 GiB: AWS c6i.large,
#: us-east-1, Linux), to turn measured throughput into dollars per million requests.
CPU_REPLICA_USD_PER_HOUR = 0.085


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(store: Path, args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "distill_pipeline.cli", "--store", str(store), "serve", "--port", str(port), *args]
    env = {
        **os.environ,
        "DISTILL_TEACHER_API_KEY": "sk-bench",
        "DISTILL_LEDGER_JOURNAL": str(log.parent / f"journal-{port}"),
    }
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def load(url: str, route: str, bodies: list[dict], concurrency: int) -> dict[str, float]:
    """Send every body with ``concurrency`` callers; throughput and latency percentiles of the 200s."""
    latencies: list[float] = []
    failures = 0
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def caller() -> None:
            nonlocal failures
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                try:
                    response = await client.post(route, json=body)
                except httpx.TransportError:
                    # A dropped connection is a failed request, counted like a 5xx.
                    failures += 1
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = np.sort(np.asarray(latencies)) * 1000
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ordered, 50)) if len(ordered) else float("nan"),
        "p99_ms": float(np.percentile(ordered, 99)) if len(ordered) else float("nan"),
        "failed": failures,
        "requests": len(bodies),
    }


def chat_body(prompt, text: str, model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt.render(text)}]}


def hybrid_curve(store: LocalStore, folder: Path, responses: Path) -> tuple[list[list[str]], dict[str, float]]:
    """Offline: the champion's P(toxic) on its frozen test rows, GPT-4's logged label, the human label."""
    import litellm

    from distill_pipeline.data.parsing import parse_label
    from distill_pipeline.students.adapters import fetch_adapter
    from distill_pipeline.students.predict import load_adapter_student
    from distill_pipeline.teachers.client import ClientSettings, TeacherClient
    from distill_pipeline.teachers.ledger import Ledger

    task = load_task()
    champion = Champion(store).current()
    assert champion is not None, "no champion in the store"
    pointer = {"prefix": f"test_sets/v{champion['test_sets_version']:04d}/"}
    rows = []
    for name in ("in_distribution", "balanced"):
        rows += pq.read_table(TestSets(store).table(pointer, name, folder)).to_pylist()
    gold = {r["comment_text"]: int(r["is_bad"]) for r in pq.read_table(responses).to_pylist()}
    logged = {}
    for r in pq.read_table(responses).to_pylist():
        if r["teacher_model"] == GPT4 and r["prompt_id"] == "simple_prompt":
            logged.setdefault(r["comment_text"], r["raw_response"])
    rows = [r for r in rows if r["input"] in gold and r["input"] in logged]
    student = load_adapter_student(fetch_adapter(store, champion["adapter_prefix"], folder / "adapter"), device="cpu")
    labels, probabilities = student.predict([r["input"] for r in rows])
    p_toxic = np.asarray([p[1] for p in probabilities])
    student_label = np.asarray(labels)
    teacher_label = np.asarray([parse_label(logged[r["input"]], task.label).label or 0 for r in rows])
    human = np.asarray([gold[r["input"]] for r in rows])
    threshold = student.decision.threshold if student.decision else 0.5
    # GPT-4's price from the teacher client's table (litellm's price map), at the logged token counts.
    client = TeacherClient(ClientSettings(), Ledger(store, folder / "journal"))
    price, source = client.price_of(GPT4)
    prompt = task.prompt("simple_prompt")
    costs = [
        price.cost(
            litellm.token_counter(model="gpt-4", text=prompt.render(r["input"])) + 7,
            litellm.token_counter(model="gpt-4", text=logged[r["input"]]),
        )
        for r in rows
    ]
    per_call = float(np.mean(costs))
    table = []
    for half_width in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0):
        lo, hi = max(0.0, threshold - half_width), min(1.0, threshold + half_width)
        deferred = (p_toxic >= lo) & (p_toxic <= hi) if half_width > 0 else np.zeros(len(rows), bool)
        if half_width >= 1.0:
            deferred = np.ones(len(rows), bool)
        answer = np.where(deferred, teacher_label, student_label)
        accuracy = bootstrap_interval(human, answer, task.label.values)
        table.append([
            f"[{lo:.2f}, {hi:.2f}]" if 0 < half_width < 1 else ("none (student only)" if half_width == 0 else "all (teacher only)"),
            accuracy.text(),
            f"{deferred.mean():.1%}",
            f"${deferred.mean() * per_call * 1000:.3f}",
        ])  # fmt: skip
    facts = {"rows": len(rows), "threshold": threshold, "gpt4_usd_per_call": per_call, "price_source": source or "none"}
    return table, facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store", type=Path, required=True, help="a local store with a champion (bench_quality --keep DIR: DIR/store)"
    )
    parser.add_argument("--data", type=Path, default=JIGSAW_TEACHER_RESPONSES)
    parser.add_argument("--teacher-latency-ms", type=float, default=500.0)
    parser.add_argument("--requests", type=int, default=400, help="student requests per concurrency level")
    parser.add_argument(
        "--teacher-requests", type=int, default=64, help="teacher requests at concurrency 1 (x8 at 8 and 64)"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "serve.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    store_dir = work / "store"
    # A copy: the servers log into it and keep a ledger; the benchmark leaves the given store as it was.
    shutil.copytree(args.store, store_dir, ignore=shutil.ignore_patterns("logs", "feedback", "ledger"))
    store = LocalStore(store_dir)
    task = load_task()
    prompt = task.prompt("simple_prompt")
    texts = list(dict.fromkeys(pq.read_table(args.data, columns=["comment_text"]).column("comment_text").to_pylist()))
    texts = [t for t in texts if len(t) < 2000]
    levels = (1, 8, 64)
    speed_rows = []
    results: dict[str, dict[int, dict[str, float]]] = {}
    cursor = 0

    def take(n: int) -> list[str]:
        nonlocal cursor
        chosen = texts[cursor : cursor + n]
        cursor += n
        assert len(chosen) == n, "not enough distinct comments"
        return chosen

    with running_server(work / "teacher.log", latency_ms=args.teacher_latency_ms) as teacher_url:
        common = ["--teacher", "openai/gpt-4", "--teacher-api-base", teacher_url + "/v1", "--teacher-concurrency", "128",
                  "--max-in-flight", "1024", "--max-queue", "4096"]  # fmt: skip
        configs = [
            ("student, micro-batched (full)", ["--mode", "full", *common], "student"),
            (
                "student, one forward per request (--max-batch 1)",
                ["--mode", "full", "--max-batch", "1", *common],
                "student",
            ),
            ("teacher through this server (dark)", ["--mode", "dark", *common], "teacher"),
        ]
        for name, server_args, kind in configs:
            process, url = start_server(store_dir, server_args, work / f"serve-{len(results)}.log")
            try:
                for route in ("/v1/classify", "/v1/chat/completions"):
                    for level in levels:
                        n = args.requests if kind == "student" else args.teacher_requests * (1 if level == 1 else 8)
                        chosen = take(n) if kind == "teacher" else texts[:n]
                        bodies = [
                            {"texts": [t]} if route == "/v1/classify" else chat_body(prompt, t, task.id) for t in chosen
                        ]
                        asyncio.run(load(url, route, bodies[: min(16, n)], min(level, 16)))  # warm up
                        result = asyncio.run(load(url, route, bodies, level))
                        results.setdefault(f"{name} {route}", {})[level] = result
            finally:
                stop(process)
        for level in levels:
            n = args.teacher_requests * (1 if level == 1 else 8)
            bodies = [chat_body(prompt, t, "gpt-4") for t in take(n)]
            results.setdefault("teacher directly /v1/chat/completions", {})[level] = asyncio.run(
                load(teacher_url, "/v1/chat/completions", bodies, level)
            )
    baseline = results["teacher directly /v1/chat/completions"]
    for name, by_level in results.items():
        for level, r in by_level.items():
            speed_rows.append([name, str(level), f"{r['rps']:.1f}", f"{r['rps'] / baseline[level]['rps']:.1f}x",
                               f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['failed']}/{r['requests']}"])  # fmt: skip

    curve, facts = hybrid_curve(store, work / "curve", args.data)
    student_rps = results["student, micro-batched (full) /v1/classify"][64]["rps"]
    student_per_million = CPU_REPLICA_USD_PER_HOUR / 3600 / student_rps * 1e6
    teacher_per_million = facts["gpt4_usd_per_call"] * 1e6
    import torch

    lines = [
        "# The student server: speed against the teacher path, hybrid's cost and quality",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores (shared with other work), Python "
        f"{platform.python_version()}, torch {torch.__version__}, httpx {httpx.__version__}. Loopback; "
        f"the teacher is the project's test server at {args.teacher_latency_ms:.0f} ms per answer. Student: the champion "
        f"of `{args.store}` ({Champion(store).current()['train_id']}), on CPU. Command: `python bench/bench_serve.py "
        f"--store {args.store}`.",
        "",
        "## Speed (ratio: throughput against calling the teacher directly at the same concurrency)",
        "",
        markdown_table(speed_rows, ["path", "concurrency", "req/s", "vs teacher", "p50 ms", "p99 ms", "failed"]),
        "",
        "## Hybrid on Jigsaw (offline: the champion's probabilities and GPT-4's logged answers)",
        "",
        f"{facts['rows']} frozen test rows of the champion (in-distribution and balanced), scored against the human "
        f"`is_bad`; the band is centred on the student's decision threshold {facts['threshold']:.3f}. GPT-4 "
        f"({GPT4}) costs ${facts['gpt4_usd_per_call'] * 1000:.3f} per 1,000 calls at these prompts' token counts "
        f"(price from {facts['price_source']}). Accuracy with a 95% bootstrap interval over rows.",
        "",
        markdown_table(
            curve,
            [
                "band of P(toxic) sent to the teacher",
                "accuracy vs human",
                "calls to the teacher",
                "teacher $ per 1k calls",
            ],
        ),
        "",
        "## Cost per million requests",
        "",
        f"- student: ${student_per_million:.2f} (a 2-vCPU replica at ${CPU_REPLICA_USD_PER_HOUR}/h, an assumed "
        f"on-demand price, at the measured {student_rps:.0f} req/s of /v1/classify at concurrency 64)",
        f"- teacher (GPT-4): ${teacher_per_million:,.0f}",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
