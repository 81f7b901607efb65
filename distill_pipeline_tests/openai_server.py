"""A small OpenAI-compatible HTTP server for the tests and benchmarks: scripted teachers on loopback.

litellm reaches it exactly as production reaches OpenAI (``openai/<model>`` with ``api_base``),
so retries, rate limits, timeouts, token accounting and batch polling are exercised over real
HTTP. It serves:

- ``POST /v1/chat/completions``: the scripted answer for the (model, user message), else a
  keyword rule that answers the toxicity task as GPT-4 did (a fenced ``{"is_bad": N}``);
  ``usage`` counted with litellm's tokenizer, so litellm's price map gives real costs;
- ``POST /v1/completions``: a text completion, as vLLM serves a decoder student's LoRA adapter by
  name: the scripted answer for the (model, prompt), else `` toxic`` or `` ok`` by the keyword
  rule, with the first token's ``top_logprobs`` when ``logprobs`` is asked;
- ``POST /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
  ``POST /v1/batches``, ``GET /v1/batches/{id}``: an OpenAI-style batch that completes after
  ``batch_delay_s``, its output file answering every line as the chat endpoint would;
- ``POST /_control``: faults and settings at run time (latency, a storm of 429s with
  ``Retry-After`` for a share of requests over a time window, a burst of 5xx answers, a
  requests-per-minute limit enforced with 429s, models that do not exist, every chat request
  refused with a status (``echo_key_status``: 400, 401, ...) whose error body quotes the key and
  the ``Authorization`` header it received, as a careless provider or proxy might);
- ``GET /_stats``: what it saw: requests by status, answers paid (200s), the number of paid
  answers to a request it had already paid for once (duplicates), and the most requests that
  arrived in any 60-second window, and a fingerprint (:func:`credential_fingerprint`) of each
  ``Authorization`` header chat requests carried, so a test knows which key was sent without the
  server keeping it.

Run it as ``python -m distill_pipeline_tests.openai_server --port N [--script FILE]``; a script
is JSONL of ``{"model": ..., "content": ..., "response": ...}`` (``model`` ``"*"`` for any).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

#: The one API key the server refuses (401), for tests of credential errors.
INVALID_KEY = "sk-invalid-key"
# Words that make the default rule answer "toxic": enough for tests to know the right label.
TOXIC_WORDS = frozenset({"idiot", "stupid", "hate", "moron", "dumb", "kill", "loser", "ugly", "shut"})
_WORDS = re.compile(r"[a-z']+")
_INPUT_IN_PROMPT = re.compile(r"Input text: '(.*)'", re.DOTALL)


def default_answer(content: str) -> str:
    """The toxicity answer the default rule gives for a prompt, in GPT-4's fenced JSON shape."""
    match = _INPUT_IN_PROMPT.search(content)
    text = (match.group(1) if match else content).lower()
    is_bad = int(any(word in TOXIC_WORDS for word in _WORDS.findall(text)))
    return f'```json\n{{"is_bad": {is_bad}}}\n```'


#: How sure the server is of a 0/1 answer token: its log-probability is log(LABEL_CONFIDENCE), the
#: other digit's log(1 - LABEL_CONFIDENCE), so a soft label read from them is (0.1, 0.9).
LABEL_CONFIDENCE = 0.9
_ANSWER_TOKENS = re.compile(r"\w+|\s+|[^\w\s]")


def answer_logprobs(answer: str, top: int) -> list[dict[str, Any]]:
    """OpenAI-style per-token log-probabilities of an answer: every token certain but the digits
    0 and 1, which carry the other digit as their runner-up."""
    positions = []
    for token in _ANSWER_TOKENS.findall(answer):
        if token in ("0", "1"):
            other = "1" if token == "0" else "0"
            chosen, runner_up = math.log(LABEL_CONFIDENCE), math.log(1 - LABEL_CONFIDENCE)
            alternatives = [{"token": token, "logprob": chosen}, {"token": other, "logprob": runner_up}]
        else:
            chosen, alternatives = 0.0, [{"token": token, "logprob": 0.0}]
        positions.append({"token": token, "logprob": chosen, "top_logprobs": alternatives[:top] if top else []})
    return positions


def credential_fingerprint(authorization: str) -> str:
    """What the server's stats show of an ``Authorization`` header: a short hash, never the key."""
    return hashlib.sha256(authorization.encode()).hexdigest()[:16]


def _count_tokens(text: str) -> int:
    import litellm

    return int(litellm.token_counter(model="gpt-4", text=text))


@dataclass
class Faults:
    latency_s: float = 0.0
    storm_until: float = 0.0
    storm_fraction: float = 0.0
    storm_retry_after_s: float = 1.0
    storm_carry: float = 0.0
    error_status: int = 503
    errors_left: int = 0
    rpm_limit: int | None = None
    missing_models: frozenset[str] = frozenset()
    batch_delay_s: float = 0.5
    echo_key_status: int | None = None


@dataclass
class Stats:
    by_status: Counter[int] = field(default_factory=Counter)
    paid_by_key: Counter[str] = field(default_factory=Counter)
    arrivals: list[float] = field(default_factory=list)
    batch_lines: int = 0
    credentials: set[str] = field(default_factory=set)

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": sum(self.by_status.values()),
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "paid": sum(self.paid_by_key.values()),
            "distinct_paid": len(self.paid_by_key),
            "duplicate_paid": sum(n - 1 for n in self.paid_by_key.values() if n > 1),
            "max_requests_per_60s": _max_in_window(self.arrivals, 60.0),
            "first_arrival": self.arrivals[0] if self.arrivals else None,
            "last_arrival": self.arrivals[-1] if self.arrivals else None,
            "batch_lines": self.batch_lines,
            "credentials": sorted(self.credentials),
        }


def _max_in_window(times: list[float], window_s: float) -> int:
    best = 0
    for i, start in enumerate(times):
        best = max(best, bisect.bisect_left(times, start + window_s, lo=i) - i)
    return best


class TeacherServer:
    def __init__(self, script: dict[tuple[str, str], str] | None = None) -> None:
        self.script = script or {}
        self.faults = Faults()
        self.stats = Stats()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------- answers
    def _scripted(self, model: str, content: str) -> str:
        return self.script.get((model, content)) or self.script.get(("*", content)) or default_answer(content)

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        model = str(body.get("model", ""))
        messages = body.get("messages") or []
        content = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
        answer = self._scripted(model, content)
        prompt_tokens = _count_tokens(content) + 7  # the chat format's per-message overhead
        completion_tokens = _count_tokens(answer)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": "stop",
        }
        if body.get("logprobs"):
            choice["logprobs"] = {"content": answer_logprobs(answer, int(body.get("top_logprobs") or 0))}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:20]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @staticmethod
    def _request_key(body: dict[str, Any]) -> str:
        wanted = {k: body.get(k) for k in ("model", "messages", "temperature", "max_tokens", "top_p")}
        return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()

    def _fault(self, now: float, model: str) -> web.Response | None:
        faults = self.faults
        if model in faults.missing_models:
            return _error(404, f"The model `{model}` does not exist", "model_not_found")
        if faults.errors_left > 0:
            faults.errors_left -= 1
            return _error(faults.error_status, "upstream overloaded", "server_error")
        if now < faults.storm_until:
            # Deterministic share: exactly `fraction` of the storm's requests are refused.
            faults.storm_carry += faults.storm_fraction
            if faults.storm_carry >= 1.0:
                faults.storm_carry -= 1.0
                return _rate_limited(faults.storm_retry_after_s)
        if faults.rpm_limit is not None:
            start = bisect.bisect_left(self.stats.arrivals, now - 60.0)
            if len(self.stats.arrivals) - start > faults.rpm_limit:
                return _rate_limited(max(0.05, self.stats.arrivals[start] + 60.0 - now))
        return None

    # ---------------------------------------------------------------- handlers
    async def chat(self, request: web.Request) -> web.Response:
        now = time.time()
        self.stats.arrivals.append(now)
        try:
            body = await request.json()
        except json.JSONDecodeError:
            self.stats.by_status[400] += 1
            return _error(400, "body is not JSON", "invalid_request_error")
        received = request.headers.get("Authorization", "")
        self.stats.credentials.add(credential_fingerprint(received))
        if self.faults.echo_key_status is not None:
            status = self.faults.echo_key_status
            self.stats.by_status[status] += 1
            token = received.removeprefix("Bearer ")
            message = f"Request refused: {token} is not valid here (received Authorization: {received})"
            return _error(status, message, "echoed_credentials")
        if received == f"Bearer {INVALID_KEY}":
            self.stats.by_status[401] += 1
            return _error(401, "Incorrect API key provided", "invalid_api_key")
        fault = self._fault(now, str(body.get("model", "")))
        if fault is not None:
            self.stats.by_status[fault.status] += 1
            return fault
        if self.faults.latency_s:
            await asyncio.sleep(self.faults.latency_s)
        payload = self._completion(body)
        self.stats.by_status[200] += 1
        self.stats.paid_by_key[self._request_key(body)] += 1
        return web.json_response(payload)

    async def completion(self, request: web.Request) -> web.Response:
        self.stats.arrivals.append(time.time())
        body = await request.json()
        model, prompt = str(body.get("model", "")), str(body.get("prompt", ""))
        fault = self._fault(time.time(), model)
        if fault is not None:
            self.stats.by_status[fault.status] += 1
            return fault
        if self.faults.latency_s:
            await asyncio.sleep(self.faults.latency_s)
        toxic = '"is_bad": 1' in default_answer(prompt)
        answer = self.script.get((model, prompt)) or self.script.get(("*", prompt)) or (" toxic" if toxic else " ok")
        choice: dict[str, Any] = {"index": 0, "text": answer, "finish_reason": "stop", "logprobs": None}
        if body.get("logprobs"):
            first = answer.split()[0] if answer.split() else answer
            other = " ok" if first.strip() == "toxic" else " toxic"
            choice["logprobs"] = {"tokens": [f" {first}"], "top_logprobs": [{f" {first}": -0.1, other: -2.4}]}
        self.stats.by_status[200] += 1
        return web.json_response(
            {"id": f"cmpl-{uuid.uuid4().hex[:20]}", "object": "text_completion", "created": int(time.time()),
             "model": model, "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        )  # fmt: skip

    async def upload_file(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            return _error(400, "missing file", "invalid_request_error")
        data = upload.file.read()
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = data
        return web.json_response(self._file_object(file_id, str(form.get("purpose", "batch"))))

    def _file_object(self, file_id: str, purpose: str = "batch") -> dict[str, Any]:
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(self.files[file_id]),
            "created_at": int(time.time()),
            "filename": f"{file_id}.jsonl",
            "purpose": purpose,
            "status": "processed",
        }

    async def get_file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return _error(404, f"no file {file_id}", "invalid_request_error")
        return web.json_response(self._file_object(file_id))

    async def file_content(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return _error(404, f"no file {file_id}", "invalid_request_error")
        return web.Response(body=self.files[file_id], content_type="application/octet-stream")

    async def create_batch(self, request: web.Request) -> web.Response:
        body = await request.json()
        input_file_id = body.get("input_file_id")
        if input_file_id not in self.files:
            return _error(400, f"no input file {input_file_id}", "invalid_request_error")
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        lines = [json.loads(line) for line in self.files[input_file_id].splitlines() if line.strip()]
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body.get("endpoint", "/v1/chat/completions"),
            "input_file_id": input_file_id,
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "created_at": int(time.time()),
            "ready_at": time.time() + self.faults.batch_delay_s,
            "output_file_id": None,
            "error_file_id": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
            "_lines": lines,
        }
        return web.json_response(self._batch_object(batch_id))

    def _batch_object(self, batch_id: str) -> dict[str, Any]:
        batch = self.batches[batch_id]
        if batch["status"] != "completed" and time.time() >= batch["ready_at"]:
            self._complete_batch(batch)
        elif batch["status"] == "validating":
            batch["status"] = "in_progress"
        return {k: v for k, v in batch.items() if not k.startswith("_") and k != "ready_at"}

    def _complete_batch(self, batch: dict[str, Any]) -> None:
        out = []
        for line in batch["_lines"]:
            body = line.get("body", {})
            out.append(
                {
                    "id": f"batch_req_{uuid.uuid4().hex[:16]}",
                    "custom_id": line.get("custom_id"),
                    "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": self._completion(body)},
                    "error": None,
                }
            )
            self.stats.paid_by_key[self._request_key(body)] += 1
            self.stats.batch_lines += 1
        output_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[output_id] = "".join(json.dumps(o) + "\n" for o in out).encode()
        batch.update(
            status="completed",
            output_file_id=output_id,
            completed_at=int(time.time()),
            request_counts={"total": len(out), "completed": len(out), "failed": 0},
        )

    async def list_batches(self, request: web.Request) -> web.Response:
        data = [self._batch_object(batch_id) for batch_id in reversed(list(self.batches))]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    async def get_batch(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            return _error(404, f"no batch {batch_id}", "invalid_request_error")
        return web.json_response(self._batch_object(batch_id))

    async def control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("reset"):
            # Back to a well-behaved server with no history: each test starts from here.
            self.faults, self.stats, self.script, self.batches = Faults(), Stats(), {}, {}
        faults = self.faults
        now = time.time()
        if "latency_ms" in body:
            faults.latency_s = float(body["latency_ms"]) / 1000.0
        if "storm" in body:
            storm = body["storm"]
            faults.storm_until = now + float(storm["duration_s"])
            faults.storm_fraction = float(storm.get("fraction", 0.5))
            faults.storm_retry_after_s = float(storm.get("retry_after_s", 1.0))
            faults.storm_carry = 0.0
        if "errors" in body:
            faults.errors_left = int(body["errors"]["count"])
            faults.error_status = int(body["errors"].get("status", 503))
        if "rpm_limit" in body:
            faults.rpm_limit = None if body["rpm_limit"] is None else int(body["rpm_limit"])
        if "missing_models" in body:
            faults.missing_models = frozenset(body["missing_models"])
        if "echo_key_status" in body:
            faults.echo_key_status = None if body["echo_key_status"] is None else int(body["echo_key_status"])
        if "batch_delay_s" in body:
            faults.batch_delay_s = float(body["batch_delay_s"])
            # Batches already running take the new delay too (a provider speeding up, or a test moving on).
            for batch in self.batches.values():
                batch["ready_at"] = min(batch["ready_at"], now + faults.batch_delay_s)
        if "script" in body:
            for entry in body["script"]:
                self.script[(entry.get("model", "*"), entry["content"])] = entry["response"]
        if body.get("reset_stats"):
            self.stats = Stats()
        return web.json_response({"ok": True})

    async def stats_handler(self, request: web.Request) -> web.Response:
        stats = self.stats.as_json()
        stats["batches"] = len(self.batches)
        if "since" in request.query:
            # The busiest 60-second window of one phase of a run, not of everything before it.
            since = float(request.query["since"])
            arrivals = self.stats.arrivals[bisect.bisect_left(self.stats.arrivals, since) :]
            stats["max_requests_per_60s"] = _max_in_window(arrivals, 60.0)
        return web.json_response(stats)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat),
                web.post("/chat/completions", self.chat),
                web.post("/v1/completions", self.completion),
                web.post("/v1/files", self.upload_file),
                web.get("/v1/files/{file_id}", self.get_file),
                web.get("/v1/files/{file_id}/content", self.file_content),
                web.post("/v1/batches", self.create_batch),
                web.get("/v1/batches", self.list_batches),
                web.get("/v1/batches/{batch_id}", self.get_batch),
                web.post("/_control", self.control),
                web.get("/_stats", self.stats_handler),
                web.get("/health", lambda _request: _health()),
            ]
        )
        return app


async def _health() -> web.Response:
    return web.json_response({"ok": True})


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": kind}}, status=status)


def _rate_limited(retry_after_s: float) -> web.Response:
    response = _error(429, "Rate limit reached for requests", "rate_limit_exceeded")
    response.headers["Retry-After"] = f"{retry_after_s:.3f}"
    return response


def load_script(path: Path) -> dict[tuple[str, str], str]:
    script = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                entry = json.loads(line)
                script[(entry.get("model", "*"), entry["content"])] = entry["response"]
    return script


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(
    log_path: Path, *, script: Path | None = None, latency_ms: float = 0.0, start_timeout_s: float = 60.0
) -> Iterator[str]:
    """Run the server in its own process group on loopback; yields its base URL, stops it by PID."""
    port = _free_port()
    command = [sys.executable, "-m", "distill_pipeline_tests.openai_server", "--port", str(port)]
    command += ["--latency-ms", str(latency_ms)]
    if script is not None:
        command += ["--script", str(script)]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(Path(__file__).parents[1])}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"teacher test server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"teacher test server did not start:\n{log_path.read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5.0)
            except ProcessLookupError:
                pass


def control(url: str, **settings: Any) -> None:
    """Change the running server's faults or settings (see ``TeacherServer.control``)."""
    request = urllib.request.Request(
        url + "/_control", data=json.dumps(settings).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10.0) as response:
        response.read()


def server_stats(url: str, since: float | None = None) -> dict[str, Any]:
    """What the server saw; ``since`` (a Unix time) limits the busiest-window count to later arrivals."""
    query = "" if since is None else f"?since={since}"
    with urllib.request.urlopen(url + "/_stats" + query, timeout=10.0) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--script", type=Path, help="JSONL of {model, content, response}")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    server = TeacherServer(load_script(args.script) if args.script else None)
    server.faults.latency_s = args.latency_ms / 1000.0
    _count_tokens("warm up the tokenizer before the first request")
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
