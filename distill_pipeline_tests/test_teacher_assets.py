"""``teacher_labels`` in its teacher modes, materialised through Dagster against the test server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from distill_pipeline.core.layout import teacher_labels_prefix
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import load_task
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.data.ingest import raw_logs
from distill_pipeline.defs.logs.assets import teacher_logs
from distill_pipeline.defs.teachers.labelling import teacher_labels
from distill_pipeline.defs.teachers.resources import TeacherPrice, TeacherResource
from distill_pipeline.defs.teachers.resources import resources as teacher_definitions
from distill_pipeline.logs.importer import ColumnMapping, import_table
from distill_pipeline.logs.schema import LogRecord, encode_log_object, log_object_key
from distill_pipeline_tests.openai_server import control, credential_fingerprint, server_stats

DAY = "2026-03-05"
ASSETS = [teacher_logs, raw_logs, teacher_labels]
PRICES = {
    name: TeacherPrice(input_per_mtok=2.0, output_per_mtok=8.0) for name in ("teacher-a", "teacher-b", "teacher-c")
}


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def comments(n: int) -> list[str]:
    return [f"comment {i}: you idiot" if i % 2 == 0 else f"comment {i}: thanks for the fix" for i in range(n)]


def write_day(store: LocalStore, records: list[LogRecord]) -> None:
    for record in records:
        record.timestamp = f"{DAY}T10:00:00+00:00"
    store.put_bytes(log_object_key(DAY, "app-0001"), encode_log_object([r.to_json() for r in records]))


def materialize(
    store: LocalStore,
    instance: dg.DagsterInstance,
    teacher: TeacherResource,
    asset: str,
    run_config: dict | None = None,
):
    return dg.materialize(
        ASSETS,
        selection=[asset],
        partition_key=DAY,
        resources={"store": StoreResource(url=store.url), "task": TaskResource(name="toxicity"), "teacher": teacher},
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
    )


def metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    (materialization,) = result.asset_materializations_for_node("teacher_labels")
    return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}


def table(store: LocalStore, name: str) -> list[dict]:
    path = store.root / teacher_labels_prefix(DAY) / name
    return duckdb.connect().sql(f"SELECT * FROM '{path}' ORDER BY request_id").to_arrow_table().to_pylist()


def teacher(url: str, tmp_path: Path, **overrides) -> TeacherResource:
    settings = {
        "mode": "relabel",
        "models": ["openai/teacher-a", "openai/teacher-b", "openai/teacher-c"],
        "api_base": url + "/v1",
        "api_key": "sk-secret-test-key",
        "prices": PRICES,
        "journal_dir": str(tmp_path / "journal"),
    }
    return TeacherResource(**(settings | overrides))


def test_relabel_with_three_teachers_votes_and_exports_disagreements(teacher_url, tmp_path, instance):
    store = LocalStore(tmp_path / "store")
    texts = comments(8)
    # Production logged the wrong label for every row; the teachers are asked again.
    write_day(store, [LogRecord(t, "openai/gpt-3.5", "simple_prompt", '{"is_bad": 0}') for t in texts])
    prompt = load_task("toxicity").prompt("simple_prompt")
    # teacher-c disagrees with the other two on the first two comments.
    control(teacher_url, script=[
        {"model": "teacher-c", "content": prompt.render(texts[0]), "response": '{"is_bad": 0}'},
        {"model": "teacher-c", "content": prompt.render(texts[1]), "response": '{"is_bad": 1}'},
    ])  # fmt: skip
    resource = teacher(teacher_url, tmp_path)
    assert materialize(store, instance, resource, "raw_logs").success
    result = materialize(store, instance, resource, "teacher_labels")
    assert result.success, result.get_step_failure_events()
    meta = metadata(result)
    assert meta["mode"] == "relabel" and meta["teacher_calls"] == 24 and meta["teacher_cache_hits"] == 0
    assert meta["teacher_cost_usd"] > 0 and meta["inputs_to_review"] == 2
    assert "sk-secret-test-key" not in repr(meta)
    labels = {row["input"]: row for row in table(store, "labels.parquet")}
    assert all(labels[t]["label"] == (1 if "idiot" in t else 0) for t in texts)
    assert {row["label_source"] for row in labels.values()} == {"teacher"}
    assert labels[texts[0]]["teacher_agreement"] == pytest.approx(2 / 3)
    assert labels[texts[2]]["teacher_agreement"] == 1.0 and labels[texts[2]]["teacher_votes"] == 3
    assert labels[texts[2]]["model"].startswith("vote: openai/teacher-a")
    review = table(store, "review.parquet")
    assert sorted(row["input"] for row in review) == sorted(texts[:2])
    assert '"teacher": "openai/teacher-c / simple_prompt / T=0"' in review[0]["votes"]

    # The same day again: every answer comes from the ledger, the server sees nothing.
    before = server_stats(teacher_url)["requests"]
    again = materialize(store, instance, resource, "teacher_labels")
    assert again.success
    assert metadata(again)["teacher_calls"] == 0 and metadata(again)["teacher_cache_hits"] == 24
    assert server_stats(teacher_url)["requests"] == before
    assert table(store, "labels.parquet") == list(sorted(labels.values(), key=lambda r: r["request_id"]))


def test_fill_asks_teachers_only_where_the_log_has_no_label(teacher_url, tmp_path, instance):
    store = LocalStore(tmp_path / "store")
    texts = comments(6)
    write_day(
        store,
        [
            LogRecord(texts[0], "openai/gpt-4", "simple_prompt", '{"is_bad": 1}'),
            LogRecord(texts[1], "openai/gpt-4", "simple_prompt", '{"is_bad": 0}'),
            LogRecord(texts[2], "openai/gpt-4", "simple_prompt", None, error="timeout"),
            LogRecord(texts[3], "openai/gpt-4", "simple_prompt", "I cannot answer that"),
            LogRecord(texts[4], "openai/gpt-4", "simple_prompt", '{"is_bad": 1}'),
            LogRecord(texts[5], "openai/gpt-4", "simple_prompt", '{"is_bad": 0}'),
        ],
    )
    resource = teacher(teacher_url, tmp_path, mode="fill", models=["openai/teacher-a"])
    assert materialize(store, instance, resource, "raw_logs").success
    result = materialize(store, instance, resource, "teacher_labels")
    assert result.success
    assert metadata(result)["teacher_calls"] == 2 and metadata(result)["labelled"] == 6
    rows = {row["input"]: row for row in table(store, "labels.parquet")}
    assert {t for t, r in rows.items() if r["label_source"] == "teacher"} == {texts[2], texts[3]}
    assert rows[texts[2]]["label"] == 1 and rows[texts[3]]["model"] == "openai/teacher-a"
    assert rows[texts[0]]["model"] == "openai/gpt-4" and rows[texts[0]]["teacher_agreement"] is None


def checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}


def test_every_teacher_call_failing_fails_the_run(teacher_url, tmp_path, instance):
    store = LocalStore(tmp_path / "store")
    write_day(store, [LogRecord(t, "openai/gpt-4", "simple_prompt", '{"is_bad": 0}') for t in comments(3)])
    control(teacher_url, missing_models=["teacher-a"])
    resource = teacher(teacher_url, tmp_path, models=["openai/teacher-a"], max_retries=0)
    assert materialize(store, instance, resource, "raw_logs").success
    result = materialize(store, instance, resource, "teacher_labels")
    # Every row quarantined with its reason; the parse-failure check has no answer to judge and
    # passes, so the failure rate and the empty day are what stop the run.
    assert not result.success
    assert checks(result) == {"parse_failure_rate": True, "teacher_failure_rate": False, "labelled_rows": False}
    assert metadata(result)["labelled"] == 0 and metadata(result)["teacher_failed"] == 3
    assert metadata(result)["teacher_failure_rate"] == 1.0
    (reason,) = {row["reason"] for row in table(store, "quarantine.parquet")}
    assert reason.startswith("teacher: provider error: openai/teacher-a: NotFoundError")


def test_teacher_failures_over_the_limit_fail_the_run(teacher_url, tmp_path, instance):
    store = LocalStore(tmp_path / "store")
    texts = comments(10)
    # Eight rows keep their logged label; the two that go to the teacher both fail.
    logged = [LogRecord(t, "openai/gpt-4", "simple_prompt", '{"is_bad": 0}') for t in texts[:8]]
    write_day(store, logged + [LogRecord(t, "openai/gpt-4", "simple_prompt", None, error="timeout") for t in texts[8:]])
    control(teacher_url, missing_models=["teacher-a"])
    resource = teacher(teacher_url, tmp_path, mode="fill", models=["openai/teacher-a"], max_retries=0)
    assert materialize(store, instance, resource, "raw_logs").success
    result = materialize(store, instance, resource, "teacher_labels")
    assert not result.success
    assert checks(result) == {"parse_failure_rate": True, "teacher_failure_rate": False, "labelled_rows": True}
    assert metadata(result)["labelled"] == 8 and metadata(result)["teacher_failure_rate"] == 1.0


def test_a_day_with_rows_and_no_label_fails(tmp_path, instance):
    store = LocalStore(tmp_path / "store")
    write_day(store, [LogRecord(t, "openai/gpt-4", "simple_prompt", None, error="timeout") for t in comments(4)])
    resource = TeacherResource(mode="logged")
    assert materialize(store, instance, resource, "raw_logs").success
    result = materialize(store, instance, resource, "teacher_labels")
    assert not result.success
    assert checks(result) == {"parse_failure_rate": True, "teacher_failure_rate": True, "labelled_rows": False}
    assert metadata(result)["rows_in"] == 4 and metadata(result)["labelled"] == 0


def test_a_partial_launchpad_config_keeps_what_was_configured_at_load(teacher_url, tmp_path, instance, monkeypatch):
    store = LocalStore(tmp_path / "store")
    write_day(store, [LogRecord(t, "openai/gpt-4", "simple_prompt", '{"is_bad": 0}') for t in comments(4)])
    monkeypatch.setenv("DISTILL_TEACHER_MODE", "relabel")
    monkeypatch.setenv("DISTILL_TEACHERS", "openai/teacher-a,openai/teacher-b")
    monkeypatch.setenv("DISTILL_TEACHER_API_BASE", teacher_url + "/v1")
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", "sk-configured-at-load")
    resource = teacher_definitions().resources["teacher"]
    # The launchpad sets two fields; mode, models, api_base and the key stay as configured at load.
    launchpad = {"resources": {"teacher": {"config": {"max_retries": 1, "journal_dir": str(tmp_path / "journal")}}}}
    assert materialize(store, instance, resource, "raw_logs").success
    result = materialize(store, instance, resource, "teacher_labels", run_config=launchpad)
    assert result.success
    meta = metadata(result)
    assert meta["mode"] == "relabel" and meta["teacher_calls"] == 8 and meta["labelled"] == 4
    assert "openai/teacher-b" in meta["teachers"]
    assert server_stats(teacher_url)["credentials"] == [credential_fingerprint("Bearer sk-configured-at-load")]


def test_budget_stops_the_run_and_keeps_what_was_paid(teacher_url, tmp_path, instance):
    store = LocalStore(tmp_path / "store")
    write_day(store, [LogRecord(t, "openai/gpt-4", "simple_prompt", '{"is_bad": 0}') for t in comments(20)])
    pricey = {"teacher-a": TeacherPrice(input_per_mtok=1000.0, output_per_mtok=1000.0)}
    resource = teacher(
        teacher_url, tmp_path, models=["openai/teacher-a"], prices=pricey, budget_usd=0.4, max_concurrency=1
    )
    assert materialize(store, instance, resource, "raw_logs").success
    result = materialize(store, instance, resource, "teacher_labels")
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert "budget of $0.4000 reached" in str(failure.event_specific_data.error)
    paid = server_stats(teacher_url)["paid"]
    assert 0 < paid < 20
    more = teacher(teacher_url, tmp_path, models=["openai/teacher-a"], prices=pricey, budget_usd=10.0)
    result = materialize(store, instance, more, "teacher_labels")
    assert result.success and metadata(result)["teacher_cache_hits"] == paid
    assert server_stats(teacher_url)["paid"] == 20 and server_stats(teacher_url)["duplicate_paid"] == 0


def test_relabel_through_the_batch_api(teacher_url, tmp_path, instance):
    store = LocalStore(tmp_path / "store")
    texts = comments(6)
    write_day(store, [LogRecord(t, "openai/gpt-3.5", "simple_prompt", '{"is_bad": 0}') for t in texts])
    control(teacher_url, batch_delay_s=0.2)
    resource = teacher(teacher_url, tmp_path, models=["openai/teacher-a"], batch=True, batch_poll_s=0.1)
    assert materialize(store, instance, resource, "raw_logs").success
    result = materialize(store, instance, resource, "teacher_labels")
    assert result.success
    meta = metadata(result)
    assert meta["teacher_calls"] == 6 and meta["labelled"] == 6
    stats = server_stats(teacher_url)
    assert stats["requests"] == 0 and stats["batches"] == 1 and stats["batch_lines"] == 6
    # The batch price: half of the configured $2 / $8 per million tokens.
    tokens_cost = (meta["teacher_prompt_tokens"] * 2.0 + meta["teacher_completion_tokens"] * 8.0) / 1e6
    assert meta["teacher_cost_usd"] == pytest.approx(tokens_cost / 2)


def test_unlabelled_inputs_are_imported_and_filled_by_the_teacher(teacher_url, tmp_path, instance):
    store = LocalStore(tmp_path / "store")
    texts = comments(4)
    source = tmp_path / "unlabelled.jsonl"
    source.write_text("".join(json.dumps({"text": t, "answer": None}) + "\n" for t in texts))
    mapping = ColumnMapping(
        input="text", response="answer",
        constants={"error": "not sent to a teacher yet", "model": "none", "prompt_template_id": "simple_prompt"},
    )  # fmt: skip
    import_table(store, source, mapping, default_day=DAY, task=load_task("toxicity"))
    resource = teacher(teacher_url, tmp_path, mode="fill", models=["openai/teacher-a"])
    assert materialize(store, instance, resource, "raw_logs").success
    result = materialize(store, instance, resource, "teacher_labels")
    assert result.success and metadata(result)["labelled"] == 4 and metadata(result)["teacher_calls"] == 4
    rows = {row["input"]: row["label"] for row in table(store, "labels.parquet")}
    assert rows == {t: int("idiot" in t) for t in texts}
