"""No key is written in clear, even when a provider quotes back the key it received.

The test server refuses every call with an error body that quotes the key and the
``Authorization`` header it was sent (a 400: each call fails and is quarantined; a 401: the run
stops on the refused key). For each way a key reaches a teacher, ``teacher_labels`` is
materialised in relabel mode and every file the runs wrote (the store, the ledger's journal,
DAGSTER_HOME with its event log and compute logs) is searched for the key. The redaction itself
is tested on what it must take out and on what it must leave alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from distill_pipeline.core.secrets import (
    REDACTED,
    RedactedError,
    errors_redacted,
    is_secret_variable,
    redact,
    register_secret,
)
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import load_task
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.teachers.resources import TeacherResource
from distill_pipeline.defs.teachers.resources import resources as teacher_definitions
from distill_pipeline.logs.schema import LogRecord
from distill_pipeline.teachers.client import ClientSettings, TeacherClient, TeacherSpec
from distill_pipeline.teachers.ledger import Ledger
from distill_pipeline_tests.openai_server import control, credential_fingerprint, server_stats
from distill_pipeline_tests.test_teacher_assets import ASSETS, DAY, comments, write_day

# The key of each way of passing one. Two are letters only: no pattern recognises them, only
# their value (the environment's, the configured one) can give them away.
KEYS = {
    "OPENAI_API_KEY": "sk-proj-Zq8LmN3vR7tY1wX5cB9dF2gH4jK6pQ0sT3uV",
    "DISTILL_TEACHER_API_KEY": "ProxyQwErTyUiOpAsDfGhJkLzXcVbNm",
    "api_key config": "ConfiguredKeyWithoutAnyDigitsInIt",
}
TEACHER_ENV = ("OPENAI_API_KEY", "DISTILL_TEACHER_API_KEY", "DISTILL_TEACHER_MODE", "DISTILL_TEACHERS")


def teacher_passing_key(
    way: str, url: str, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[TeacherResource, dict]:
    """The teacher resource and run config that give the server ``KEYS[way]`` the way it names."""
    for name in (*TEACHER_ENV, "DISTILL_TEACHER_API_BASE"):
        monkeypatch.delenv(name, raising=False)
    settings = {"mode": "relabel", "models": ["openai/teacher-a"], "api_base": url + "/v1"}
    settings |= {"max_retries": 0, "journal_dir": str(journal)}
    if way == "OPENAI_API_KEY":  # litellm reads it itself: the project never sees the key
        monkeypatch.setenv("OPENAI_API_KEY", KEYS[way])
        return TeacherResource(**settings), {}
    if way == "api_key config":
        return TeacherResource(**settings, api_key=KEYS[way]), {}
    # The code location's own resource, from the environment, with a partial launchpad config.
    monkeypatch.setenv("DISTILL_TEACHER_MODE", "relabel")
    monkeypatch.setenv("DISTILL_TEACHERS", "openai/teacher-a")
    monkeypatch.setenv("DISTILL_TEACHER_API_BASE", url + "/v1")
    monkeypatch.setenv("DISTILL_TEACHER_API_KEY", KEYS[way])
    resource = teacher_definitions().resources["teacher"]
    run_config = {"resources": {"teacher": {"config": {"max_retries": 0, "journal_dir": str(journal)}}}}
    return resource, run_config


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes, or whose Parquet columns once decoded, hold ``secret``."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        held = secret.encode() in path.read_bytes()
        if not held and path.suffix == ".parquet":
            rows = duckdb.connect().sql(f"SELECT * FROM '{path}'").fetchall()
            held = secret in repr(rows)
        if held:
            found.append(str(path.relative_to(root)))
    return found


@pytest.mark.parametrize("status", [400, 401])
@pytest.mark.parametrize("way", list(KEYS))
def test_an_echoed_key_is_written_nowhere(teacher_url, tmp_path, monkeypatch, way, status):
    key = KEYS[way]
    store = LocalStore(tmp_path / "store")
    write_day(store, [LogRecord(t, "openai/gpt-4", "simple_prompt", '{"is_bad": 0}') for t in comments(4)])
    control(teacher_url, echo_key_status=status)
    teacher, run_config = teacher_passing_key(way, teacher_url, tmp_path / "journal", monkeypatch)
    resources = {"store": StoreResource(url=store.url), "task": TaskResource(name="toxicity"), "teacher": teacher}
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        runs = dict(partition_key=DAY, resources=resources, run_config=run_config, instance=instance)
        results = [
            dg.materialize(ASSETS, selection=[asset], raise_on_error=False, **runs)
            for asset in ("raw_logs", "teacher_labels")
        ]
    # The server did get this key, and quoted it back; nothing the runs wrote holds it.
    assert credential_fingerprint(f"Bearer {key}") in server_stats(teacher_url)["credentials"]
    assert list((dagster_home / "storage").rglob("*.err")), "no compute log was captured"
    assert files_holding(tmp_path, key) == []
    assert results[0].success and not results[1].success
    echoed = f"Request refused: {REDACTED} is not valid here (received Authorization: {REDACTED})"
    if status == 400:  # every call failed: quarantined with the provider's (redacted) words
        quarantine = store.root / "tables/teacher_labels" / f"dt={DAY}" / "quarantine.parquet"
        reasons = {row[0] for row in duckdb.connect().sql(f"SELECT reason FROM '{quarantine}'").fetchall()}
        assert len(reasons) == 1 and echoed in reasons.pop()
    else:  # the refused key stops the run, saying what the provider said
        (failure,) = results[1].get_step_failure_events()
        message = str(failure.event_specific_data.error)
        assert "refused the API key" in message and echoed in message


def test_an_answer_that_quotes_the_key_is_kept_redacted(teacher_url, tmp_path):
    key = "LedgerKeyQuotedBackInAnAnswer"
    template = load_task("toxicity").prompt("simple_prompt")
    text = "comment 0: thanks for the fix"
    answer = f'{{"is_bad": 0}} (answered for {key})'
    control(teacher_url, script=[{"model": "teacher-a", "content": template.render(text), "response": answer}])
    ledger = Ledger.open(LocalStore(tmp_path / "store"), tmp_path / "journal")
    client = TeacherClient(ClientSettings(api_base=teacher_url + "/v1", api_key=key), ledger)
    (answered,) = client.label(TeacherSpec("openai/teacher-a"), template, [text])
    ledger.close()
    assert answered.response == f'{{"is_bad": 0}} (answered for {REDACTED})'
    assert files_holding(tmp_path, key) == []


# ------------------------------------------------------------------------------ the redaction

PROVIDER_VARIABLES = [
    "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_API_KEY", "AZURE_OPENAI_API_KEY", "GEMINI_API_KEY",
    "GOOGLE_API_KEY", "MISTRAL_API_KEY", "COHERE_API_KEY", "GROQ_API_KEY", "TOGETHERAI_API_KEY",
    "DEEPSEEK_API_KEY", "HUGGINGFACE_API_KEY", "OPENROUTER_API_KEY", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "DISTILL_TEACHER_API_KEY", "WATSONX_APIKEY", "HF_TOKEN", "MY_PROXY_SECRET",
    "DB_PASSWORD",
]  # fmt: skip


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in PROVIDER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


@pytest.mark.parametrize("name", PROVIDER_VARIABLES)
def test_the_value_of_every_credential_variable_is_redacted(clean_environment, name):
    value = "OpaqueLettersOnlyCredential"  # no pattern would know it for a key
    assert redact(f"provider said: {value} is wrong") == f"provider said: {value} is wrong"
    clean_environment.setenv(name, value)
    assert is_secret_variable(name)
    assert redact(f"provider said: {value} is wrong") == f"provider said: {REDACTED} is wrong"


@pytest.mark.parametrize(
    "name", ["PATH", "HOME", "AWS_ACCESS_KEY_ID", "TOKENIZERS_PARALLELISM", "DISTILL_TEACHER_MODE", "TOKEN_LIMIT"]
)
def test_ordinary_variables_are_not_secrets(name):
    assert not is_secret_variable(name)


def test_short_variable_values_are_not_taken_for_keys(clean_environment):
    # A test placeholder such as moto's "testing" must not blank the word everywhere.
    clean_environment.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert redact("testing the parser") == "testing the parser"


def test_a_registered_key_is_redacted_the_longest_first():
    register_secret("RegisteredKeyAlpha")
    register_secret("RegisteredKeyAlphaBeta")
    assert redact("got RegisteredKeyAlphaBeta and RegisteredKeyAlpha") == f"got {REDACTED} and {REDACTED}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Received Authorization: Bearer abcDEF123456ghiJKL", f"Received Authorization: {REDACTED}"),
        ("headers {'authorization': 'Basic dXNlcjpwYXNzd29yZA=='}", f"headers {{'authorization': '{REDACTED}'}}"),
        ('"Authorization": "Token 9f8e7d6c5b4a39281706"', f'"Authorization": "{REDACTED}"'),
        ("sent Bearer eyJhbGciOiJIUzI1NiJ9.e30.ZRrHA1JJJW8opsbCGfG_HACGpVUMN_a9IV7pAx_Zmeo", f"sent Bearer {REDACTED}"),
        ("Incorrect API key provided: sk-proj-Zq8LmN3vR7tY1wX5cB9dF2", f"Incorrect API key provided: {REDACTED}"),
        ("key sk-ant-api03-AbCdEf0123456789GhIjKl-mnop", f"key {REDACTED}"),
        ("groq gsk_4fG7hJ2kL9mN3pQ6rS8tV1wX5yZ0aB", f"groq {REDACTED}"),
        ("hf hf_AbCdEfGhIjKlMnOpQrStUvWx12", f"hf {REDACTED}"),
        ("google AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q rejected", f"google {REDACTED} rejected"),
        ("aws AKIAIOSFODNN7EXAMPLE denied", f"aws {REDACTED} denied"),
        ('{"api_key": "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"}', f'{{"api_key": "{REDACTED}"}}'),
        ("x-api-key=Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5", f"x-api-key={REDACTED}"),
        ("session token: IQoJb3JpZ2luX2VjEHUaCXVzLWVhc3QtMSJH", f"session token: {REDACTED}"),
        ("the secret is 8d7c6b5a4f3e2d1c0b9a", f"the secret is {REDACTED}"),
        ("postgres://distill:hunter2hunter2@db:5432/x", f"postgres://distill:{REDACTED}@db:5432/x"),
    ],
)
def test_credentials_are_redacted(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The key point is that this comment is rude; the token count was 1234 and the secret is out.",
        "bearer instruments need a basic understanding of authorization failed errors",
        "max_tokens: 256, temperature 0.7, 1234567890123456789 rows, $0.0042 spent, 99.5% parsed",
        "request id req_8f3a9b2c1d4e5f60718293a4b5c6d7e8 (chatcmpl-abc123def456ghi789)",
        "x-request-id: 6f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b, batch_67a1b2c3d4e5f60718293a4b",
        "sk-learn-compatible estimators; a task-level limit; tokenizer_config_v2_2024_final",
        "hf_hub_download_function_name_is_long and the monkey 1234567890abcdef1234",
        "litellm.NotFoundError: OpenAIException - The model `teacher-a` does not exist",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text


def test_an_error_holding_a_secret_is_raised_again_redacted_without_its_chain():
    with pytest.raises(RedactedError) as raised, errors_redacted():
        try:
            raise ConnectionError("proxy refused Authorization: Bearer abcDEF123456ghiJKL")
        except ConnectionError as exc:
            raise RuntimeError("teacher call failed") from exc
    assert str(raised.value) == (
        f"RuntimeError: teacher call failed; caused by ConnectionError: proxy refused Authorization: {REDACTED}"
    )
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_an_error_holding_no_secret_is_raised_unchanged():
    error = ValueError("budget of $0.4000 reached")
    with pytest.raises(ValueError) as raised, errors_redacted():
        raise error
    assert raised.value is error
