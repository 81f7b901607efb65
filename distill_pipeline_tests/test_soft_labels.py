"""Soft labels: the teacher's distribution over labels from its log-probabilities or from votes."""

from __future__ import annotations

import math

import pytest

from distill_pipeline.core.task import Task, load_task
from distill_pipeline.teachers.client import TeacherSpec
from distill_pipeline.teachers.soft import (
    distribution_from_logprobs,
    from_json_keys,
    to_json_keys,
    token_label,
    vote_distribution,
)
from distill_pipeline_tests.openai_server import LABEL_CONFIDENCE, answer_logprobs, server_stats
from distill_pipeline_tests.test_teacher import MODEL, client_for


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task("toxicity")


def position(token: str, *alternatives: tuple[str, float]) -> dict:
    chosen = dict(alternatives).get(token, 0.0)
    return {"token": token, "logprob": chosen, "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alternatives]}


def test_tokens_name_labels_by_value_or_alias(task):
    label = task.label
    assert [token_label(t, label) for t in ("1", " 0", '"1', "true", " Toxic", "yes")] == [1, 0, 1, 1, 1, 1]
    assert [token_label(t, label) for t in ("2", "", " ", "is_bad", "{", "-1")] == [None] * 6


def test_the_distribution_is_read_where_the_parsed_label_is_said(task):
    # ```json {"is_bad": 1} ```: an earlier "0" in the text is not the answer; the last "1" is.
    positions = [
        position("0", ("0", 0.0)),
        position("is_bad", ("is_bad", 0.0)),
        position("1", ("1", math.log(0.7)), ("0", math.log(0.2)), (" maybe", math.log(0.1))),
        position("}", ("}", 0.0)),
    ]
    distribution = distribution_from_logprobs(positions, 1, task.label)
    # Renormalised over the labels: the 0.1 on a token that is no label drops out.
    assert distribution == pytest.approx({0: 0.2 / 0.9, 1: 0.7 / 0.9}, abs=1e-6)
    assert sum(distribution.values()) == pytest.approx(1.0)


def test_no_distribution_without_a_position_or_a_finite_logprob(task):
    label = task.label
    assert distribution_from_logprobs([], 1, label) is None
    assert distribution_from_logprobs([position("0", ("0", 0.0))], 1, label) is None
    assert distribution_from_logprobs([position("1", ("1", 0.0))], None, label) is None
    hostile = [{"token": "1", "logprob": float("nan"), "top_logprobs": [{"token": "0", "logprob": float("inf")}]}]
    assert distribution_from_logprobs(hostile, 1, label) is None
    # Without alternatives, the chosen token alone: certain.
    assert distribution_from_logprobs([{"token": "1", "logprob": -0.01}], 1, label) == {0: 0.0, 1: 1.0}


def test_votes_give_shares_or_the_mean_of_the_teachers_distributions():
    assert vote_distribution([1, 1, 0, None], (0, 1)) == pytest.approx({0: 1 / 3, 1: 2 / 3})
    assert vote_distribution([None, None], (0, 1)) is None
    given = [{0: 0.2, 1: 0.8}, {0: 0.6, 1: 0.4}]
    assert vote_distribution([1, 0], (0, 1), given) == pytest.approx({0: 0.4, 1: 0.6})
    # One teacher without a distribution: back to vote shares, not a mean over part of them.
    assert vote_distribution([1, 0], (0, 1), [given[0], None]) == pytest.approx({0: 0.5, 1: 0.5})


def test_a_logged_distribution_is_checked_not_trusted(task):
    label = task.label
    assert from_json_keys({"0": 0.25, "1": 0.75}, label) == {0: 0.25, 1: 0.75}
    assert from_json_keys(to_json_keys({0: 0.25, 1: 0.75}), label) == {0: 0.25, 1: 0.75}
    assert from_json_keys({"1": 1.0}, label) == {0: 0.0, 1: 1.0}
    for bad in ({"0": 0.5, "1": 0.6}, {"2": 1.0}, {"x": 1.0}, {"1": True}, {"1": float("nan")}, {"1": 1.5}, {}, None):
        assert from_json_keys(bad, label) is None


def test_the_test_servers_logprobs_read_back_as_its_confidence(task):
    positions = answer_logprobs('```json\n{"is_bad": 1}\n```', 5)
    assert distribution_from_logprobs(positions, 1, task.label) == pytest.approx(
        {0: 1 - LABEL_CONFIDENCE, 1: LABEL_CONFIDENCE}
    )


def test_the_client_keeps_each_answers_distribution_in_the_ledger(teacher_url, tmp_path, task):
    spec = TeacherSpec(MODEL, "simple_prompt", logprobs=True)
    texts = ["you idiot", "thanks for the edit"]
    client = client_for(teacher_url, tmp_path)
    answers = client.label(spec, task.prompt("simple_prompt"), texts, task.label)
    expected = [
        {"0": pytest.approx(1 - LABEL_CONFIDENCE), "1": pytest.approx(LABEL_CONFIDENCE)},
        {"0": pytest.approx(LABEL_CONFIDENCE), "1": pytest.approx(1 - LABEL_CONFIDENCE)},
    ]
    assert [a.label_distribution for a in answers] == expected
    client.ledger.close()
    # From the ledger, the distribution comes back with the answer, and nothing is paid again.
    again = client_for(teacher_url, tmp_path)
    cached = again.label(spec, task.prompt("simple_prompt"), texts, task.label)
    assert [a.label_distribution for a in cached] == expected and all(a.cached for a in cached)
    assert server_stats(teacher_url)["paid"] == 2
    # Asking without log-probabilities is another request (another ledger key): no soft label.
    plain = again.label(TeacherSpec(MODEL, "simple_prompt"), task.prompt("simple_prompt"), texts, task.label)
    assert [a.label_distribution for a in plain] == [None, None]
    assert server_stats(teacher_url)["paid"] == 4
