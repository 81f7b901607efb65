"""The student server (``distill-pipeline serve``), end to end on loopback.

A tiny BERT (random, two layers, a word-level vocabulary) is LoRA-trained by the project's trainer
in seconds on texts whose label is a nasty or a nice word; its adapter is published with a frozen
test set and a champion manifest, as the pipeline publishes them. The server runs as the real
command in its own process group, with the project's OpenAI-compatible test server as its
teacher, and is stopped by PID. What is checked is what a user and the pipeline see: the OpenAI
SDK's answer, each rollout mode's call kind, the fallback, a hot swap under load with no failed
request, the refusal of broken champions, hostile requests, and the log records and feedback
events the pipeline reads back.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import httpx  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from distill_pipeline.core.layout import CHAMPION_CURRENT, adapter_prefix  # noqa: E402
from distill_pipeline.core.store import LocalStore  # noqa: E402
from distill_pipeline.core.task import load_task  # noqa: E402
from distill_pipeline.data.ingest import ingest_objects  # noqa: E402
from distill_pipeline.logs.schema import FEEDBACK_PREFIX, LOG_PREFIX, feedback_problems  # noqa: E402
from distill_pipeline.serving.prompts import PromptMatcher  # noqa: E402
from distill_pipeline.serving.rollout import unit_hash  # noqa: E402
from distill_pipeline.serving.students import LoadSettings, SwapRefused, UpstreamEngine, load_champion  # noqa: E402
from distill_pipeline.students.adapters import publish_adapter  # noqa: E402
from distill_pipeline_tests.conftest import (  # noqa: E402
    publish_frozen_test_set,
    running_student_server,
    tiny_student_spec,
    train_tiny_student,
)
from distill_pipeline_tests.openai_server import control  # noqa: E402

NICE = ["lovely", "kind", "great", "wonderful", "thanks", "helpful", "friendly"]
NASTY = ["idiot", "stupid", "hate", "awful", "disgusting", "moron", "trash"]
FILLER = ["the", "a", "comment", "post", "about", "this", "that", "your", "my", "article", "page", "edit"]
ADMIN_TOKEN = "admin-token-for-tests-0123"
TASK = load_task()
SIMPLE = TASK.prompt("simple_prompt")


def rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = int(rng.random() < 0.5)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 9))]
        words.insert(rng.randint(0, len(words)), rng.choice(NASTY if label else NICE))
        out.append({"input": " ".join(words), "label": label, "request_id": f"r{seed}-{i}"})
    return out


def _tiny_bert(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(NICE + NASTY + FILLER, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    # A wide initialisation: the classifier head of a random base learns in a few steps.
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _accuracy(adapter: Path, test: list[dict[str, Any]]) -> float:
    from distill_pipeline.trainer.predict import load_student

    student = load_student(adapter, device="cpu", log=lambda _m: None)
    labels, _ = student.predict([r["input"] for r in test])
    return sum(int(p == r["label"]) for p, r in zip(labels, test, strict=True)) / len(test)


def _negate_head(adapter: Path) -> None:
    """A champion that loads but answers the opposite: its classifier head negated."""
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    head = [k for k in weights if "classifier" in k]
    assert head, sorted(weights)
    save_file({k: -v if k in head else v for k, v in weights.items()}, adapter / "adapter_model.safetensors")


def _publish(store: LocalStore, run_dir: Path, train_id: str, accuracy: float, version: int = 1) -> dict[str, Any]:
    prefix = adapter_prefix("100pct", train_id)
    publish_adapter(store, prefix, run_dir, {"train_id": train_id})
    manifest = {
        "schema_version": 1,
        "promoted_at": f"2026-01-01T00:00:{len(train_id):02d}+00:00",
        "store": store.url,
        "adapter_prefix": prefix,
        "adapter_dir": f"{prefix}adapter/",
        "train_id": train_id,
        "train_size": "100pct",
        "train_rows": 256,
        "student": json.loads((run_dir / "adapter" / "student.json").read_text()),
        "test_sets_version": version,
        "metrics": {"in_distribution": {"accuracy": accuracy}},
        "decision": {"promote": True},
        "previous_train_id": None,
    }
    return manifest


def _promote(store: LocalStore, manifest: dict[str, Any]) -> None:
    store.put_bytes(CHAMPION_CURRENT, json.dumps(manifest).encode())


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store holding a frozen test set, a trained champion, and three challengers kept back:
    a good one, one whose head is negated, and one whose weights are not safetensors."""
    root = tmp_path_factory.mktemp("serving")
    base = _tiny_bert(root / "base")
    for name, n, seed in (("train", 256, 1), ("validation", 60, 2)):
        pq.write_table(pa.Table.from_pylist(rows(n, seed)), root / f"{name}.parquet")
    train_tiny_student(tiny_student_spec(root, base, root / "run-a"))
    store = LocalStore(root / "store")
    test = rows(120, 3)
    publish_frozen_test_set(store, test, root / "test")

    run_a = root / "run-a"
    accuracy = _accuracy(run_a / "adapter", test)
    champion = _publish(store, run_a, "a" * 16, accuracy)
    _promote(store, champion)
    # The same adapter under another train id: a challenger that serves exactly as well.
    run_b = root / "run-b"
    shutil.copytree(run_a, run_b)
    good = _publish(store, run_b, "b" * 16, accuracy)
    run_c = root / "run-c"
    shutil.copytree(run_a, run_c)
    _negate_head(run_c / "adapter")
    inverted = _publish(store, run_c, "c" * 16, accuracy)
    run_d = root / "run-d"
    shutil.copytree(run_a, run_d)
    (run_d / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    corrupt = _publish(store, run_d, "d" * 16, accuracy)
    return {"root": root, "store": store, "champion": champion, "good": good, "inverted": inverted,
            "corrupt": corrupt, "accuracy": accuracy, "test": test}  # fmt: skip


class Server:
    def __init__(self, url: str, store: LocalStore, deployments: Path, teacher: str) -> None:
        self.url = url
        self.store = store
        self.deployments = deployments
        self.teacher = teacher
        self.client = httpx.Client(base_url=url, timeout=30.0)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return self.client.request(method, path, headers=headers, **kwargs)

    def set_mode(self, **deployment: Any) -> None:
        response = self.admin("PUT", "/admin/deployments/toxicity", json=deployment)
        assert response.status_code == 200, response.text

    def chat(self, text: str, user: str = "u1") -> httpx.Response:
        body = {"model": "toxicity", "messages": [{"role": "user", "content": SIMPLE.render(text)}], "user": user}
        return self.client.post("/v1/chat/completions", json=body)

    def ready(self) -> dict[str, Any]:
        return self.client.get("/readyz").json()

    def wait_for(self, predicate, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}: {self.ready()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(
    published: dict[str, Any], teacher_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve")
    deployments = folder / "deployments.toml"
    deployments.write_text('[deployments.toxicity]\nmode = "dark"\n')
    serve_args = ["--deployments", str(deployments), "--teacher-timeout", "3", "--poll-s", "0.3",
                  "--log-flush-s", "0.2", "--max-queue", "64", "--max-batch", "16", "--max-input-chars", "2000",
                  "--max-body-bytes", "262144"]  # fmt: skip
    with running_student_server(
        published["store"].root,
        teacher_server,
        folder,
        serve_args=serve_args,
        env={"DISTILL_SERVE_ADMIN_TOKEN": ADMIN_TOKEN},
    ) as url:
        yield Server(url, published["store"], deployments, teacher_server)


@pytest.fixture
def teacher(server: Server) -> str:
    control(server.teacher, reset=True)
    return server.teacher


# ------------------------------------------------------------------------------- answers


def test_an_openai_sdk_client_gets_the_task_answer_from_the_student(server: Server, teacher: str) -> None:
    from openai import OpenAI

    server.set_mode(mode="full")
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="toxicity", messages=[{"role": "user", "content": SIMPLE.render("you are a stupid moron")}]
    )
    completion = raw.parse()
    answer = json.loads(completion.choices[0].message.content)
    assert set(answer) == {"is_bad"} and answer["is_bad"] in (0, 1)
    assert raw.headers["x-request-id"] == completion.id
    assert completion.usage.prompt_tokens > 0 and completion.usage.total_tokens > completion.usage.prompt_tokens
    extra = completion.model_extra["distill"]
    assert extra["served_by"] == "student" and extra["call_kind"] == "student" and extra["train_id"] == "a" * 16
    # The teacher was not asked.
    assert httpx.get(teacher + "/_stats").json()["requests"] == 0


def test_classify_answers_a_batch_with_labels_and_probabilities(server: Server, published: dict, teacher: str) -> None:
    server.set_mode(mode="full")
    texts = [r["input"] for r in published["test"][:20]]
    response = server.client.post("/v1/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 20
    for result in results:
        assert result["label"] in (0, 1) and result["label_name"] == ["ok", "toxic"][result["label"]]
        assert abs(sum(result["probabilities"].values()) - 1.0) < 1e-5
    agreement = sum(r["label"] == row["label"] for r, row in zip(results, published["test"], strict=False)) / 20
    assert agreement >= 0.4  # the tiny student is better than chance on its test set, not perfect


def test_each_rollout_mode_decides_who_answers(server: Server, teacher: str) -> None:
    text = "thanks for the helpful edit"

    def distill(response: httpx.Response) -> dict[str, Any]:
        assert response.status_code == 200, response.text
        return response.json()["distill"]

    # dark: the teacher's own answer, the student shadowing.
    server.set_mode(mode="dark")
    response = server.chat(text)
    assert distill(response)["call_kind"] == "shadow" and distill(response)["served_by"] == "teacher"
    assert response.json()["choices"][0]["message"]["content"] == '```json\n{"is_bad": 0}\n```'
    # hybrid: a band covering every probability defers to the teacher, an empty one never does.
    server.set_mode(mode="hybrid", band=[0.0, 1.0])
    assert distill(server.chat(text))["call_kind"] == "deferred"
    server.set_mode(mode="hybrid", band=[1.0, 1.0])
    assert distill(server.chat(text))["call_kind"] == "student"
    # canary: sticky by user; the share decides which users.
    server.set_mode(mode="canary", canary_share=0.5)
    users = [f"user-{i}" for i in range(12)]
    for user in users:
        expected = "student" if unit_hash("canary", "toxicity", user) < 0.5 else "teacher"
        first, again = distill(server.chat(text, user)), distill(server.chat(text, user))
        assert first["call_kind"] == again["call_kind"] == expected
        assert (first["train_id"] is None) == (expected == "teacher")
    # full with every call sampled: the student answers, the teacher is asked in the background.
    server.set_mode(mode="full", sample_rate=1.0)
    before = httpx.get(teacher + "/_stats").json()["requests"]
    # A text the teacher has not answered yet: the ledger would answer a repeated one.
    sampled = distill(server.chat(f"a fresh comment {time.time()}"))
    assert sampled["call_kind"] == "sample" and sampled["served_by"] == "student"
    server.wait_for(lambda: httpx.get(teacher + "/_stats").json()["requests"] > before, "the sampled teacher call")
    # A change of the deployment file is picked up without a restart; a broken one changes nothing.
    server.deployments.write_text('[deployments.toxicity]\nmode = "hybrid"\nband = [0.0, 1.0]\n')
    server.wait_for(lambda: distill(server.chat(text))["call_kind"] == "deferred", "the file's hybrid mode")
    server.deployments.write_text('[deployments.toxicity]\nmode = "sideways"\n')
    time.sleep(1.5)
    assert distill(server.chat(text))["call_kind"] == "deferred"
    assert "distill_serve_deployment_reload_errors_total 1.0" in server.client.get("/metrics").text


def test_a_teacher_that_is_down_falls_back_to_the_student(server: Server, teacher: str) -> None:
    server.set_mode(mode="dark")
    control(teacher, errors={"count": 1000, "status": 503})
    response = server.chat("your article is trash, idiot")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["distill"]["call_kind"] == "fallback" and body["distill"]["served_by"] == "student"
    assert json.loads(body["choices"][0]["message"]["content"])["is_bad"] in (0, 1)
    server.set_mode(mode="hybrid", band=[0.0, 1.0])
    assert server.chat("lovely post").json()["distill"]["call_kind"] == "fallback"


def test_a_conversation_that_is_not_the_task_goes_to_the_teacher(server: Server, teacher: str) -> None:
    control(teacher, script=[{"content": "What is 2+2?", "response": "4"}])
    body = {"model": "toxicity", "messages": [{"role": "user", "content": "What is 2+2?"}]}
    response = server.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "4"


# ------------------------------------------------------------------------- hostile requests


def test_malformed_long_and_oversized_requests_get_clear_4xx(server: Server, teacher: str) -> None:
    server.set_mode(mode="full")
    post = server.client.post
    not_json = post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "invalid request" in not_json.json()["error"]["message"]
    no_messages = post("/v1/chat/completions", json={"model": "toxicity", "messages": []})
    assert no_messages.status_code == 400 and "messages" in no_messages.json()["error"]["message"]
    unknown = post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert unknown.status_code == 404 and "toxicity" in unknown.json()["error"]["message"]
    stream = post("/v1/chat/completions", json={"model": "toxicity", "stream": True, "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
    assert stream.status_code == 400 and "stream" in stream.json()["error"]["message"]
    assert post("/v1/classify", json={"texts": "not a list"}).status_code == 400
    assert post("/v1/classify", json={"texts": ["a"] * 257}).status_code == 400
    too_big = post("/v1/classify", json={"texts": ["x" * 300_000]})
    assert too_big.status_code == 413 and "bytes" in too_big.json()["error"]["message"]
    # Chunked (no Content-Length): refused while it is read.
    chunks = (b'{"texts": ["' + b"y" * 50_000 for _ in range(8))
    chunked = post("/v1/classify", content=chunks, headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    # A 100,000-character input is truncated to --max-input-chars and answered; the server lives on.
    answered = server.chat("moron " * 16_667)
    assert answered.status_code == 200, answered.text
    assert answered.json()["distill"]["truncated"] is True
    assert server.client.get("/healthz").status_code == 200


def test_overload_is_refused_with_retry_after(server: Server, teacher: str) -> None:
    server.set_mode(mode="full")
    texts = [f"comment number {i} about the page" for i in range(40)]

    def one(_: int) -> httpx.Response:
        return httpx.post(server.url + "/v1/classify", json={"texts": texts}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(32)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert "queue is full" in refused[0].json()["error"]["message"]
    assert 200 in statuses


# ----------------------------------------------------------------------------- hot swap


def test_a_promotion_under_load_swaps_without_a_failed_request(server: Server, published: dict, teacher: str) -> None:
    server.set_mode(mode="full")
    store = published["store"]
    stop = threading.Event()
    seen: list[tuple[int, str | None]] = []

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                response = client.post("/v1/classify", json={"texts": ["a kind comment", "you idiot"]})
                train_ids = (
                    {r["train_id"] for r in response.json().get("results", [])}
                    if response.status_code == 200
                    else {None}
                )
                seen.extend((response.status_code, t) for t in train_ids)

    workers = [threading.Thread(target=load) for _ in range(6)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        _promote(store, published["good"])
        server.wait_for(lambda: server.ready()["train_id"] == "b" * 16, "the swap to the good challenger")
        time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert seen and all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:5]
    assert {"a" * 16, "b" * 16} <= {t for _, t in seen}

    # A champion that loads but fails its smoke test, then one that does not load: both refused.
    for name, why in (("inverted", "failed its smoke test"), ("corrupt", "did not load")):
        _promote(store, published[name])
        train_id = published[name]["train_id"]
        server.wait_for(
            lambda t=train_id: (server.ready().get("last_refusal") or {}).get("train_id") == t, f"refusing {name}"
        )
        ready = server.ready()
        assert ready["train_id"] == "b" * 16 and why in ready["last_refusal"]["reason"]
        assert server.client.post("/v1/classify", json={"texts": ["kind"]}).status_code == 200
    metrics = server.client.get("/metrics").text
    assert 'distill_serve_swaps_total{outcome="refused"} 2.0' in metrics
    assert 'distill_serve_model{train_id="' + "b" * 16 + '"} 1.0' in metrics
    assert "distill_serve_batch_size_bucket" in metrics and "distill_serve_queue_depth" in metrics
    _promote(store, published["good"])


# ------------------------------------------------------------------- what the pipeline reads


def test_calls_and_feedback_are_logged_for_the_pipeline(server: Server, published: dict, tmp_path: Path) -> None:
    control(server.teacher, reset=True)
    store = published["store"]
    server.set_mode(mode="dark")
    shadow = server.chat("you moron", user="logged-user").json()
    server.set_mode(mode="full")
    served = server.chat("what a lovely page", user="logged-user").json()
    feedback = server.client.post("/v1/feedback", json={"request_id": served["id"], "thumbs": "down"})
    assert feedback.status_code == 202, feedback.text
    bad = server.client.post("/v1/feedback", json={"request_id": served["id"], "thumbs": "sideways"})
    assert bad.status_code == 400

    def logged() -> list[str]:
        return [i.key for i in store.list(LOG_PREFIX + "/")]

    def records() -> dict[str, dict]:
        out = {}
        for key in logged():
            for line in store.get_bytes(key).decode().splitlines():
                record = json.loads(line)
                out[record["request_id"]] = record
        return out

    server.wait_for(lambda: {shadow["id"], served["id"]} <= set(records()), "the log records")
    (tmp_path / "work").mkdir()
    ingest_objects(store, logged(), tmp_path / "work", tmp_path / "records.parquet", tmp_path / "q.parquet")
    table = {r["request_id"]: r for r in pq.read_table(tmp_path / "records.parquet").to_pylist()}
    quarantine = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert not quarantine, quarantine[:3]
    dark, full = table[shadow["id"]], table[served["id"]]
    assert dark["call_kind"] == "shadow" and dark["served_by"] == "teacher" and dark["rollout"] == "dark"
    assert dark["response"] == '```json\n{"is_bad": 1}\n```' and dark["input"] == "you moron"
    assert full["call_kind"] == "student" and full["response"] is None and full["served_by"] == "student"
    for record in (dark, full):
        student = record["student"] if isinstance(record["student"], dict) else json.loads(record["student"])
        assert student["train_id"] in ("a" * 16, "b" * 16) and student["label"] in (0, 1)
        assert 0.0 <= student["confidence"] <= 1.0
        assert record["user_id"] == "logged-user" and record["prompt_template_id"] == "simple_prompt"

    def events() -> list[dict]:
        keys = [i.key for i in store.list(FEEDBACK_PREFIX + "/")]
        return [json.loads(line) for key in keys for line in store.get_bytes(key).decode().splitlines()]

    server.wait_for(lambda: bool(events()), "the feedback event")
    (event,) = events()
    assert event["request_id"] == served["id"] and event["feedback"] == {"thumbs": "down"}
    assert feedback_problems(event["request_id"], event["feedback"]) == []


# ------------------------------------------------------------------------------- parts


def test_the_prompt_matcher_finds_each_template_and_nothing_else() -> None:
    matcher = PromptMatcher(TASK)
    for template in TASK.prompts.values():
        found = matcher.recognise([{"role": "user", "content": template.render("it's a 'quoted' input\nover lines")}])
        assert found is not None and found.template.id == template.id
        assert found.input == "it's a 'quoted' input\nover lines"
    rendered = SIMPLE.render("hello")
    assert matcher.recognise([{"role": "user", "content": "What is 2+2?"}]) is None
    assert matcher.recognise([{"role": "system", "content": "be brief"}, {"role": "user", "content": rendered}]) is None
    parts = [{"type": "text", "text": rendered}]
    assert matcher.recognise([{"role": "user", "content": parts}]).input == "hello"  # type: ignore[union-attr]


def test_a_decoder_champion_is_routed_to_the_upstream_adapter_server(
    published: dict, teacher_url: str, tmp_path: Path
) -> None:
    """The project's test server stands in for vLLM serving the adapter by its train id."""
    store = published["store"]
    prefix = adapter_prefix("100pct", "e" * 16)
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    template = "Classify the text.\nText: {input}\nAnswer:"
    student = {"student_kind": "decoder", "base_model": "tiny-llama", "label_values": [0, 1],
               "label_names": ["ok", "toxic"], "max_length": 64, "prompt_template": template, "decision": None}  # fmt: skip
    (tmp_path / "run" / "adapter" / "student.json").write_text(json.dumps(student))
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    publish_adapter(store, prefix, tmp_path / "run", {})
    manifest = {**published["champion"], "train_id": "e" * 16, "adapter_prefix": prefix, "metrics": {}}
    # The stand-in answers by its keyword rule, which knows most of the test rows' nasty words.
    loaded = load_champion(store, manifest, TASK.label, LoadSettings(decoder_upstream=teacher_url))
    engine = loaded.engine
    assert isinstance(engine, UpstreamEngine) and loaded.smoke.agreement >= 0.7
    (answer,) = engine.predict(["you idiot"])
    assert answer.label == 1 and 0.9 < answer.probabilities[1] < 1.0
    stats = httpx.get(teacher_url + "/_stats").json()
    assert stats["by_status"]["200"] == len(published["test"]) + 1
    # A server that answers something else than a label is not swapped to.
    control(teacher_url, reset=True)
    control(teacher_url, errors={"count": 10_000, "status": 500})
    with pytest.raises(SwapRefused, match="smoke test"):
        load_champion(store, manifest, TASK.label, LoadSettings(decoder_upstream=teacher_url))
    engine.close()


def test_counting_a_requests_tokens_leaves_the_forward_passes_tokenizer_alone(published: dict) -> None:
    """Counting runs on the request's thread while the forward pass encodes a batch on its own: a
    shared fast tokenizer would take the count's truncation setting into the batch (a 371-token
    example past a max_length of 128 failed a forward pass)."""
    from distill_pipeline.serving.students import AdapterEngine
    from distill_pipeline.trainer.predict import load_student

    student = load_student(published["root"] / "run-a" / "adapter", device="cpu", log=lambda _m: None)
    engine = AdapterEngine(student, "a")
    long_text = "you idiot " * 200
    student.predict([long_text])
    backend = student.codec.tokenizer.backend_tokenizer
    truncating = backend.truncation
    assert truncating is not None and truncating["max_length"] == student.max_length
    assert engine.count_tokens(long_text) > student.max_length
    assert backend.truncation == truncating
    assert len(engine.predict([long_text] * 3)) == 3
