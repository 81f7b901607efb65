"""The whole loop on served traffic, on loopback, with real parts.

A tiny champion, trained and published with ``test_serving``'s helpers, is served by the real
``distill-pipeline serve`` with the project's OpenAI-compatible test server as its teacher. OpenAI
SDK clients send the task's prompt over HTTP for two days: on day 1 the deployment is dark (every
call answered by the teacher, the student shadowing) and the traffic is like the champion's training
data; on day 2 the deployment is full with every call sampled for the teacher, and a share of the
traffic is new slang on which the teacher contradicts the student, which is how drift looks from
the pipeline's side. The server's TeacherLogger writes the calls to the store; the pipeline's own
assets (``raw_logs`` -> ``teacher_labels`` -> ``drift_report``) run on each day's partition, and
the retraining sensor is ticked after each day.

The server stamps each call with the wall clock, which no product setting moves. The day is set as
``faketime`` would set it, for the log clock only: the server process starts through a launcher
that pins the date the log schema's clock reads to the day a file names (the time of day runs on),
then runs the CLI module as ``python -m`` does. One server lives through both days; the test moves
its calendar on between them as midnight would, so one TeacherLogger writes each day's calls under
that day's prefix.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import dagster as dg  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from distill_pipeline.core.layout import drift_report_prefix  # noqa: E402
from distill_pipeline.core.published import RawLogs, TeacherLabels  # noqa: E402
from distill_pipeline.core.store import LocalStore  # noqa: E402
from distill_pipeline.core.tables import read_report  # noqa: E402
from distill_pipeline.core.task import PromptTemplate, Task, load_task  # noqa: E402
from distill_pipeline.defs.data.ingest import raw_logs  # noqa: E402
from distill_pipeline.defs.monitoring.assets import SHADOW_AGREEMENT_CHECK, drift_report  # noqa: E402
from distill_pipeline.defs.monitoring.jobs import DRIFT_DAY_TAG, DRIFT_SIGNAL_TAG, TRIGGER_TAG  # noqa: E402
from distill_pipeline.defs.monitoring.sensors import drift_retraining_sensor  # noqa: E402
from distill_pipeline.defs.teachers.labelling import teacher_labels  # noqa: E402
from distill_pipeline.logs.schema import LOG_PREFIX  # noqa: E402
from distill_pipeline.monitoring import drift  # noqa: E402
from distill_pipeline_tests.conftest import (  # noqa: E402
    publish_frozen_test_set,
    running_student_server,
    tiny_student_spec,
    train_tiny_student,
)
from distill_pipeline_tests.openai_server import control  # noqa: E402
from distill_pipeline_tests.test_monitoring import DAYS, _resources, tiny_task  # noqa: E402
from distill_pipeline_tests.test_serving import (  # noqa: E402
    ADMIN_TOKEN,
    FILLER,
    Server,
    _accuracy,
    _promote,
    _publish,
    _tiny_bert,
    rows,
)

DAY_1, DAY_2 = DAYS[0], DAYS[1]
CALENDAR_ENV = "DISTILL_SERVED_CALENDAR"
# Run as ``python -c`` before the CLI. The log schema's clock (the ``datetime`` module that
# ``logs.schema`` stamps records and feedback with) keeps its time of day on the date the file
# names; nothing else in the process is touched, since compiled extensions refuse a stand-in for
# the datetime class itself. The launcher checks the pin took, so a schema that reads the clock
# some other way fails here rather than logging on the real day.
CALENDAR_LAUNCHER = f"""
import datetime, os, runpy, sys, types
from pathlib import Path

from distill_pipeline.logs import schema

_calendar = Path(os.environ[{CALENDAR_ENV!r}])

class _PinnedDate(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        day = datetime.date.fromisoformat(_calendar.read_text().strip())
        return datetime.datetime.now(tz).replace(year=day.year, month=day.month, day=day.day)

class _Calendar(types.ModuleType):
    def __getattr__(self, name):
        return getattr(datetime, name)

clock = _Calendar("datetime")
clock.datetime = _PinnedDate
schema.dt = clock
pinned = _calendar.read_text().strip()
if schema.LogRecord(input="", model="", prompt_template_id="", response=None).day != pinned:
    sys.exit(f"the log schema's clock is not pinned to {{pinned}}: it no longer reads schema.dt")
sys.argv[0] = "distill-pipeline"
runpy.run_module("distill_pipeline.cli", run_name="__main__", alter_sys=True)
"""
# Words the champion never saw (its tokenizer reads them as [UNK]): the new traffic of day 2.
SLANG = ["ratio", "cringe", "clown", "npc", "sus", "bozo", "mid", "yikes"]
HEALTHY_DAY_1, HEALTHY_DAY_2, DRIFTED_DAY_2 = 80, 40, 40
MIN_LIVE_PAIRS, MARGIN = 40, 0.05


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store holding a frozen test set and a promoted champion trained as ``test_serving``'s, for
    longer and with larger batches: strong enough on its test set that a healthy day agrees."""
    root = tmp_path_factory.mktemp("served-loop")
    base = _tiny_bert(root / "base")
    for name, n, seed in (("train", 256, 1), ("validation", 60, 2)):
        pq.write_table(pa.Table.from_pylist(rows(n, seed)), root / f"{name}.parquet")
    training = {"epochs": 20, "batch_size": 32, "lr_schedule": "constant", "warmup_ratio": 0.0}
    train_tiny_student(tiny_student_spec(root, base, root / "run", **training))
    store = LocalStore(root / "store")
    test = rows(120, 3)
    publish_frozen_test_set(store, test, root / "test")
    accuracy = _accuracy(root / "run" / "adapter", test)
    manifest = _publish(store, root / "run", "a" * 16, accuracy)
    _promote(store, manifest)
    return {"store": store, "adapter": root / "run" / "adapter", "manifest": manifest, "accuracy": accuracy}


def _task(folder: Path) -> Task:
    """The tiny monitoring task, judging live agreement from 40 pairs on with a 0.05 margin."""
    path = tiny_task(folder).source / "task.toml"
    text = path.read_text()
    assert "[monitoring]\n" in text
    path.write_text(
        text.replace(
            "[monitoring]\n", f"[monitoring]\nmin_live_pairs = {MIN_LIVE_PAIRS}\nlive_agreement_margin = {MARGIN}\n"
        )
    )
    task = load_task(folder)
    assert (task.monitoring.min_live_pairs, task.monitoring.live_agreement_margin) == (MIN_LIVE_PAIRS, MARGIN)
    return task


def _slang_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts: set[str] = set()
    while len(texts) < n:
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 7))]
        words.insert(rng.randint(0, len(words)), rng.choice(SLANG))
        texts.add(" ".join(words))
    return sorted(texts)


def _answer(label: int) -> str:
    return f'```json\n{{"is_bad": {label}}}\n```'


def _send(url: str, prompt: PromptTemplate, texts: list[str]) -> list[Any]:
    """Each text as an OpenAI SDK chat completion with the task's prompt, eight callers at a time."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def one(i: int) -> Any:
        return client.chat.completions.create(
            model="toxicity", messages=[{"role": "user", "content": prompt.render(texts[i])}], user=f"user-{i % 13}"
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(len(texts))))


def _logged(store: LocalStore) -> dict[str, dict[str, str]]:
    """The request ids and timestamps of the records under each day's log prefix."""
    out: dict[str, dict[str, str]] = {}
    for item in store.list(LOG_PREFIX + "/"):
        key = re.fullmatch(rf"{LOG_PREFIX}/dt=(\d{{4}}-\d{{2}}-\d{{2}})/[^/]+\.jsonl", item.key)
        assert key is not None, f"not a log object: {item.key}"
        for line in store.get_bytes(item.key).decode().splitlines():
            record = json.loads(line)
            out.setdefault(key.group(1), {})[record["request_id"]] = record["timestamp"]
    return out


def _wait_logged(store: LocalStore, day: str, request_ids: set[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not request_ids <= set(_logged(store).get(day, {})):
        assert time.monotonic() < deadline, f"the calls of {day} were not all logged within {timeout_s:g}s"
        time.sleep(0.2)


def test_drift_on_served_traffic_starts_one_retraining(
    champion: dict[str, Any], teacher_server: str, tmp_path: Path
) -> None:
    from distill_pipeline.trainer.predict import load_student

    store: LocalStore = champion["store"]
    champion_id = champion["manifest"]["train_id"]
    reference = champion["accuracy"]  # the champion's agreement on its frozen test set
    task = _task(tmp_path / "task")
    prompt = task.prompt("simple_prompt")

    # The teacher labels traffic like the champion's training data as that data was labelled; on the
    # slang it says the opposite of what the champion says.
    healthy_1, healthy_2 = rows(HEALTHY_DAY_1, 21), rows(HEALTHY_DAY_2, 22)
    drifted = _slang_texts(DRIFTED_DAY_2, 23)
    offline = load_student(champion["adapter"], device="cpu", log=lambda _m: None)
    champion_says, _ = offline.predict(drifted)
    teacher_says = {row["input"]: row["label"] for row in healthy_1 + healthy_2}
    teacher_says |= {text: 1 - int(label) for text, label in zip(drifted, champion_says, strict=True)}
    control(teacher_server, reset=True)
    control(teacher_server, script=[{"content": prompt.render(t), "response": _answer(v)} for t, v in teacher_says.items()])  # fmt: skip

    folder = tmp_path / "serve"
    folder.mkdir()
    calendar = folder / "calendar"
    calendar.write_text(DAY_1)
    deployments = folder / "deployments.toml"
    deployments.write_text('[deployments.toxicity]\nmode = "dark"\n')
    serve_args = ["--deployments", str(deployments), "--teacher-timeout", "5", "--poll-s", "0.5", "--log-flush-s", "0.2"]  # fmt: skip
    with running_student_server(
        store.root,
        teacher_server,
        folder,
        serve_args=serve_args,
        global_args=["--task", str(task.source)],
        env={"DISTILL_SERVE_ADMIN_TOKEN": ADMIN_TOKEN, CALENDAR_ENV: str(calendar)},
        entry=("-c", CALENDAR_LAUNCHER),
    ) as url:
        server = Server(url, store, deployments, teacher_server)
        texts_1 = [row["input"] for row in healthy_1]
        day_1 = _send(url, prompt, texts_1)
        for text, completion in zip(texts_1, day_1, strict=True):
            distill = completion.model_extra["distill"]
            assert (distill["call_kind"], distill["served_by"], distill["train_id"]) == (
                "shadow",
                "teacher",
                champion_id,
            )
            assert completion.choices[0].message.content == _answer(teacher_says[text])
        _wait_logged(store, DAY_1, {c.id for c in day_1})

        # Midnight: the same server, its calendar on the next day, the deployment now full with
        # every call also sent to the teacher.
        calendar.write_text(DAY_2)
        server.set_mode(mode="full", sample_rate=1.0)
        texts_2 = [row["input"] for row in healthy_2] + drifted
        day_2 = _send(url, prompt, texts_2)
        for completion in day_2:
            distill = completion.model_extra["distill"]
            assert (distill["call_kind"], distill["served_by"], distill["train_id"]) == (
                "sample",
                "student",
                champion_id,
            )
            assert json.loads(completion.choices[0].message.content)["is_bad"] in (0, 1)
        _wait_logged(store, DAY_2, {c.id for c in day_2})

    # Each day's calls, and nothing else, under that day's prefix, stamped on that day.
    logged = _logged(store)
    assert set(logged) == {DAY_1, DAY_2}
    assert set(logged[DAY_1]) == {c.id for c in day_1} and set(logged[DAY_2]) == {c.id for c in day_2}
    assert all(stamp.startswith(day) for day in logged for stamp in logged[day].values())

    with dg.instance_for_test() as instance:

        def pipeline(day: str) -> tuple[dict[str, Any], bool]:
            """The day's drift report, and whether its shadow_agreement check passed."""
            result = dg.materialize(
                [raw_logs, teacher_labels, drift_report],
                partition_key=day,
                resources=_resources(store, task),
                instance=instance,
                raise_on_error=False,
            )
            assert result.success
            report = read_report(store, drift_report_prefix(day))
            assert report is not None
            checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
            return report, checks[SHADOW_AGREEMENT_CHECK]

        def tick(cursor: str | None) -> dg.SensorResult | dg.SkipReason:
            return drift_retraining_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))

        def served_pairs(day: str, kind: str, texts: list[str]) -> int:
            """Checks the day's tables against what was sent; returns the pairs the student got right."""
            scratch = tmp_path / day
            records = pq.read_table(RawLogs(store).records(day, scratch)).to_pylist()
            labels = pq.read_table(TeacherLabels(store).labels(day, scratch)).to_pylist()
            assert sorted(r["input"] for r in records) == sorted(texts)
            assert {(r["call_kind"], r["rollout"]) for r in records} == {(kind, "dark" if kind == "shadow" else "full")}
            # Every pair's label is the teacher's answer, never the student's.
            teacher = {row["request_id"]: row["label"] for row in labels}
            assert teacher == {r["request_id"]: teacher_says[r["input"]] for r in records}
            student = {r["request_id"]: json.loads(r["student"]) for r in records}
            assert {s["train_id"] for s in student.values()} == {champion_id}
            return sum(student[rid]["label"] == label for rid, label in teacher.items())

        def live_agreement(report: dict[str, Any], pairs: int, agreed: int) -> dict[str, Any]:
            live = report["live"]
            assert live["champion_train_id"] == champion_id and live["reference_agreement"] == pytest.approx(reference)
            (cell,) = live["agreement"]
            assert (cell["train_id"], cell["pairs"], cell["agreed"], cell["biased"]) == (
                champion_id,
                pairs,
                agreed,
                False,
            )
            assert cell["low"] <= agreed / pairs <= cell["high"]
            (signal,) = [s for s in report["signals"] if s["name"] == drift.LIVE_AGREEMENT_DROP]
            assert signal["value"] == pytest.approx(reference - cell["high"])
            return {**cell, "fired": signal["fired"]}

        # Day 1: healthy; the interval reaches the champion's test agreement, and nothing is launched.
        report_1, check_1 = pipeline(DAY_1)
        agreed_1 = served_pairs(DAY_1, "shadow", texts_1)
        day_1_live = live_agreement(report_1, HEALTHY_DAY_1, agreed_1)
        assert not day_1_live["fired"] and reference - day_1_live["high"] <= MARGIN and check_1
        after_day_1 = tick(None)
        assert isinstance(after_day_1, dg.SensorResult) and after_day_1.run_requests == []

        # Day 2: the slang pairs disagree (the champion's answer in the log is the one it gave
        # offline), and the whole interval lies below day 1's and more than the margin below the
        # champion's test agreement.
        report_2, check_2 = pipeline(DAY_2)
        agreed_2 = served_pairs(DAY_2, "sample", texts_2)
        assert agreed_2 <= HEALTHY_DAY_2
        day_2_live = live_agreement(report_2, HEALTHY_DAY_2 + DRIFTED_DAY_2, agreed_2)
        assert day_2_live["high"] < day_1_live["low"]
        assert day_2_live["fired"] and reference - day_2_live["high"] > MARGIN and not check_2

        after_day_2 = tick(after_day_1.cursor)
        assert isinstance(after_day_2, dg.SensorResult)
        (request,) = after_day_2.run_requests
        assert request.run_key and DAY_2 in request.run_key
        assert request.tags[TRIGGER_TAG] == "drift" and request.tags[DRIFT_SIGNAL_TAG] == drift.LIVE_AGREEMENT_DROP
        assert request.tags[DRIFT_DAY_TAG] == DAY_2
        # Evaluated again, nothing new; a replayed tick names the same run, launched at most once.
        assert isinstance(tick(after_day_2.cursor), dg.SkipReason)
        replay = tick(after_day_1.cursor)
        assert isinstance(replay, dg.SensorResult) and [r.run_key for r in replay.run_requests] == [request.run_key]
