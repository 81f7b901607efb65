"""Teacher evaluation: scoring, ranking and recommending, gold tables, and the teacher_eval asset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.cli import main
from distill_pipeline.core.layout import GOLD_LABELS, TEACHER_EVAL_PREFIX
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import load_task
from distill_pipeline.data.gold import GoldTableError, gold_table_from
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.data.splits import test_sets as frozen_test_sets
from distill_pipeline.defs.teachers.assets import teacher_eval
from distill_pipeline.defs.teachers.resources import TeacherPrice, TeacherResource
from distill_pipeline.teachers.evaluation import (
    ConfigScore,
    SetScore,
    load_gold_sets,
    rank,
    score_responses,
)
from distill_pipeline_tests.openai_server import control

LABEL = load_task("toxicity").label


def config(model: str, accuracy_in: int, accuracy_bal: int, cost: float | None, answered: int = 100) -> ConfigScore:
    sets = {"balanced": SetScore(100, accuracy_bal, 100, 0), "in_distribution": SetScore(100, accuracy_in, 100, 0)}
    return ConfigScore(model, "simple_prompt", 0.0, sets, cost, answered)


def test_unanswered_and_unparseable_count_as_wrong():
    score = score_responses(LABEL, [1, 0, 1, 0], ['{"is_bad": 1}', '{"is_bad": 1}', None, "no idea"])
    assert (score.rows, score.correct, score.answered, score.parse_failures) == (4, 1, 3, 1)
    assert score.accuracy == 0.25 and score.parse_failure_rate == pytest.approx(1 / 3)


def test_the_most_accurate_configuration_is_recommended():
    board = rank([config("cheap", 90, 80, 0.1), config("best", 95, 93, 5.0)])
    assert [s.model for s in board.scores] == ["best", "cheap"]
    assert board.recommended.model == "best" and "highest mean accuracy" in board.reason
    assert board.scores[0].cost_per_1000 == pytest.approx(50.0)


def test_a_cheaper_configuration_within_tolerance_is_recommended():
    board = rank([config("pricey", 95, 94, 5.0), config("thrifty", 95, 93, 0.5)], tolerance=0.01)
    assert board.recommended.model == "thrifty" and "within 1.0% of the best" in board.reason


def test_only_configurations_scored_on_every_set_are_recommended():
    partial = ConfigScore("tiny", "simple_prompt", None, {"balanced": SetScore(20, 20, 20, 0)}, 0.01, 20)
    board = rank([partial, config("full", 90, 90, 1.0)])
    assert [s.model for s in board.scores] == ["full", "tiny"] and board.recommended.model == "full"
    assert "| 2 | tiny / simple_prompt / T=default | 100.0% (20) | — |" in board.markdown()


def test_gold_sets_from_a_table_with_its_own_sets(tmp_path: Path):
    gold = tmp_path / "gold.parquet"
    pq.write_table(pa.table({"input": ["a", "b", "c"], "gold_label": [1, 0, 1], "test_set": ["x", "x", "y"]}), gold)
    sets = load_gold_sets(gold, {}, (0, 1), max_rows_per_set=10, seed=1, workdir=tmp_path / "db")
    assert {s.name: sorted(s.inputs) for s in sets} == {"x": ["a", "b"], "y": ["c"]}


def test_gold_sets_from_the_frozen_test_sets(tmp_path: Path):
    gold = tmp_path / "gold.csv"
    gold.write_text("input,gold_label\na,1\nb,0\nz,1\n")
    frozen = tmp_path / "in_distribution.parquet"
    pq.write_table(pa.table({"input": ["a", "b", "c"], "label": [1, 1, 0]}), frozen)
    (only,) = load_gold_sets(gold, {"in_distribution": frozen}, (0, 1), max_rows_per_set=1, seed=1, workdir=tmp_path)
    assert only.name == "in_distribution" and len(only.inputs) == 1 and only.inputs[0] in {"a", "b"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,gold_label\na,1\n", "needs columns 'input' and 'gold_label'"),
        ("input,gold_label\na,1\nb,7\n", "outside the task's values"),
    ],
)
def test_bad_gold_tables_are_refused(tmp_path: Path, content: str, message: str):
    gold = tmp_path / "gold.csv"
    gold.write_text(content)
    with pytest.raises(GoldTableError, match=message):
        load_gold_sets(gold, {}, (0, 1), max_rows_per_set=10, seed=1, workdir=tmp_path / "db")


def test_the_gold_command_writes_a_users_table_where_teacher_eval_reads_it(tmp_path: Path, capsys):
    source = tmp_path / "reviewed.csv"
    source.write_text("comment,verdict,split\nyou idiot,toxic,bal\nnice post,0,bal\nthanks,OK,ind\n")
    store = LocalStore(tmp_path / "store")
    argv = ["--store", store.url, "gold", str(source), "--text-column", "comment", "--label-column", "verdict"]
    assert main([*argv, "--test-set-column", "split"]) == 0
    assert "wrote 3 gold rows (toxic 1, ok 2)" in capsys.readouterr().out
    assert pq.read_table(store.root / GOLD_LABELS).to_pylist() == [
        {"input": "you idiot", "gold_label": 1, "test_set": "bal"},
        {"input": "nice post", "gold_label": 0, "test_set": "bal"},
        {"input": "thanks", "gold_label": 0, "test_set": "ind"},
    ]
    sets = load_gold_sets(store.root / GOLD_LABELS, {}, (0, 1), max_rows_per_set=10, seed=1, workdir=tmp_path / "db")
    assert {s.name: len(s.inputs) for s in sets} == {"bal": 2, "ind": 1}


def test_the_gold_command_refuses_a_table_with_unknown_labels_and_writes_nothing(tmp_path: Path, capsys):
    source = tmp_path / "reviewed.csv"
    source.write_text("input,gold_label\na,1\nb,maybe\n,0\n")
    store = LocalStore(tmp_path / "store")
    assert main(["--store", store.url, "gold", str(source)]) == 2
    error = capsys.readouterr().err
    assert "2 of 3 rows cannot be gold" in error and "row 1: label 'maybe'" in error and "row 2: no text" in error
    assert not (store.root / GOLD_LABELS).exists()


def test_a_missing_file_is_an_error_message_not_a_traceback(tmp_path: Path, capsys):
    assert main(["--store", str(tmp_path / "store"), "gold", str(tmp_path / "nope.csv")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("distill-pipeline: ") and "nope.csv" in error and "Traceback" not in error


def test_gold_labels_by_name_or_value():
    table = pa.table({"input": ["a", "b", "c"], "gold_label": ["Toxic", "1.0", "0"]})
    assert gold_table_from(table, LABEL).column("gold_label").to_pylist() == [1, 1, 0]


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def test_teacher_eval_ranks_configurations_on_gold(teacher_url, tmp_path, instance):
    store = LocalStore(tmp_path / "store")
    texts = [f"comment {i}: you idiot" if i % 2 else f"comment {i}: thank you" for i in range(10)]
    gold = [i % 2 for i in range(10)]
    sets = ["in_distribution"] * 6 + ["balanced"] * 4
    table = pa.table({"input": texts, "gold_label": gold, "test_set": sets})
    local = tmp_path / "gold.parquet"
    pq.write_table(table, local)
    store.put_file(GOLD_LABELS, local)
    prompt = load_task("toxicity").prompt("simple_prompt")
    # "sloppy" answers three of the ten wrong; "careful" follows the default rule (all right).
    control(teacher_url, script=[
        {"model": "sloppy", "content": prompt.render(texts[i]), "response": f'{{"is_bad": {1 - gold[i]}}}'}
        for i in (1, 2, 7)
    ])  # fmt: skip
    resource = TeacherResource(
        models=["openai/sloppy", "openai/careful"],
        api_base=teacher_url + "/v1",
        api_key="sk-test",
        prices={
            "sloppy": TeacherPrice(input_per_mtok=1, output_per_mtok=1),
            "careful": TeacherPrice(input_per_mtok=3, output_per_mtok=3),
        },
        journal_dir=str(tmp_path / "journal"),
    )
    result = dg.materialize(
        [frozen_test_sets, teacher_eval],
        selection=["teacher_eval"],
        resources={"store": StoreResource(url=store.url), "task": TaskResource(name="toxicity"), "teacher": resource},
        instance=instance,
        run_config={"ops": {"teacher_eval": {"config": {"prompt_ids": ["simple_prompt"], "temperatures": [0.0, 0.7]}}}},
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("teacher_eval")
    meta = {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    assert meta["configurations"] == 4 and meta["teacher_calls"] == 40
    assert meta["recommended"] == "openai/careful / simple_prompt / T=0"
    assert meta["recommended_mean_accuracy"] == 1.0
    board = meta["leaderboard"]
    assert "| 3 | openai/sloppy / simple_prompt / T=0 | 75.0% (4) | 66.7% (6) |" in board
    assert store.exists(TEACHER_EVAL_PREFIX + "report.json")
