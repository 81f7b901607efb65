"""Evaluation: local metric modules against hand-computed values, baselines, agreement, mistakes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from distill_pipeline.students.evaluation import (
    Predictions,
    agreement,
    comparison_report,
    comparison_table,
    evaluate_predictions,
    latency_throughput,
    load_metric,
    majority_baseline,
    mistakes_table,
    tfidf_logreg_baseline,
)
from distill_pipeline.students.metrics import LOCAL_METRICS

# Worked by hand. Positive label 1: TP = rows 0-2, FN = row 3, FP = rows 4-5, TN = rows 6-9.
GOLD = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PREDICTED = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]


def test_metrics_load_offline_from_a_fresh_cache(tmp_path: Path) -> None:
    """Every local module loads and computes with the hub switched off and nothing cached."""
    script = textwrap.dedent(
        """
        import sys
        from distill_pipeline.students.evaluation import load_metric
        from distill_pipeline.students.metrics import LOCAL_METRICS
        for name in LOCAL_METRICS:
            print(sys.modules[type(load_metric(name)).__module__].__file__)
        print(load_metric("accuracy").compute(predictions=[1, 0, 1], references=[1, 1, 1])["accuracy"])
        """
    )
    hf_home = tmp_path / "hf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(hf_home)}
    env.pop("HF_MODULES_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *module_files, accuracy = done.stdout.split()
    # Each went through evaluate's own loader, which copies the script into its module cache.
    assert [Path(f).name for f in module_files] == [f"{name}.py" for name in LOCAL_METRICS]
    assert all(Path(f).is_relative_to(hf_home / "modules") for f in module_files)
    assert float(accuracy) == pytest.approx(2 / 3)


def test_each_local_metric_is_an_evaluate_metric() -> None:
    import evaluate

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for name in LOCAL_METRICS:
        assert isinstance(load_metric(name), evaluate.Metric), name


def test_unknown_local_metric_is_refused_and_hub_ids_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluate

    with pytest.raises(ValueError, match="no local metric"):
        load_metric("bleu")
    with pytest.raises(ValueError, match="no local metric"):
        load_metric("../metrics/accuracy")
    calls = []
    monkeypatch.setattr(evaluate, "load", lambda path, **kwargs: calls.append(path) or "hub module")
    assert load_metric("hub:bertscore") == "hub module"
    assert calls == ["bertscore"]
    load_metric.cache_clear()


def test_each_metric_module_is_loaded_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluate

    load_metric.cache_clear()
    loads = []
    real_load = evaluate.load
    monkeypatch.setattr(evaluate, "load", lambda path, **kwargs: loads.append(path) or real_load(path, **kwargs))
    for _ in range(3):
        evaluate_predictions(GOLD, PREDICTED, None, (0, 1), 1, label_names=("ok", "toxic"))
    assert sorted(Path(path).name for path in loads) == ["accuracy", "confusion_matrix", "f1", "precision", "recall"]
    load_metric.cache_clear()


def test_binary_metrics_match_the_hand_computed_confusion_matrix() -> None:
    result = evaluate_predictions(GOLD, PREDICTED, None, (0, 1), 1, label_names=("ok", "toxic"))
    assert result["confusion_matrix"] == [[4, 2], [1, 3]]
    assert result["confusion_matrix_labels"] == [0, 1]
    assert result["accuracy"] == pytest.approx(0.7)
    assert result["precision"] == pytest.approx(3 / 5)
    assert result["recall"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert result["average"] == "binary"
    assert result["roc_auc"] is None
    assert result["roc_auc_note"] == "no scores given"
    assert "| 0 (ok) | 4 | 2 |" in result["confusion_matrix_markdown"]
    assert "| 1 (toxic) | 1 | 3 |" in result["confusion_matrix_markdown"]


def test_positive_label_chooses_the_class_scored() -> None:
    result = evaluate_predictions(GOLD, PREDICTED, None, (0, 1), 0)
    assert result["precision"] == pytest.approx(4 / 5)  # predicted 0: rows 3, 6-9; correct: 6-9
    assert result["recall"] == pytest.approx(4 / 6)


def test_multi_class_uses_macro_averages() -> None:
    gold = [0, 0, 1, 1, 2, 2]
    predicted = [0, 1, 1, 1, 2, 0]
    # Per class (precision, recall, f1): 0 -> (1/2, 1/2, 1/2); 1 -> (2/3, 1, 4/5); 2 -> (1, 1/2, 2/3).
    result = evaluate_predictions(gold, predicted, None, (0, 1, 2), None)
    assert result["average"] == "macro"
    assert result["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert result["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert result["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_binary_roc_auc_from_scores() -> None:
    # Positive-negative pairs ranked right: 0.35 > 0.1, 0.8 > 0.1, 0.8 > 0.4; wrong: 0.35 < 0.4.
    result = evaluate_predictions([0, 0, 1, 1], [0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8], (0, 1), 1)
    assert result["roc_auc"] == pytest.approx(3 / 4)
    # The same ranking with the labels swapped and the score being that of label 0.
    flipped = evaluate_predictions([1, 1, 0, 0], [1, 0, 1, 0], [0.1, 0.4, 0.35, 0.8], (0, 1), 0)
    assert flipped["roc_auc"] == pytest.approx(3 / 4)
    # A probability matrix gives the same answer as the positive column.
    matrix = [[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]]
    assert evaluate_predictions([0, 0, 1, 1], [0, 1, 0, 1], matrix, (0, 1), 1)["roc_auc"] == pytest.approx(3 / 4)


def test_one_vs_rest_roc_auc_is_the_mean_of_per_class_aucs() -> None:
    gold = [0, 0, 1, 1, 2, 2]
    probabilities = np.array(
        [[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.6, 0.2], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]]
    )
    result = evaluate_predictions(gold, probabilities.argmax(axis=1), probabilities, (0, 1, 2), None)
    roc_auc = load_metric("roc_auc")
    per_class = [
        roc_auc.compute(references=[int(g == c) for g in gold], prediction_scores=probabilities[:, c].tolist())[
            "roc_auc"
        ]
        for c in range(3)
    ]
    # By hand, class 0: positives 0.7, 0.3 against negatives 0.2, 0.5, 0.1, 0.2 -> 4 + 3 of 8.
    assert per_class[0] == pytest.approx(7 / 8)
    assert result["roc_auc"] == pytest.approx(sum(per_class) / 3)


def test_roc_auc_is_undefined_when_gold_lacks_a_class() -> None:
    result = evaluate_predictions([1, 1, 1], [1, 0, 1], [0.9, 0.2, 0.7], (0, 1), 1)
    assert result["roc_auc"] is None
    assert "no example of [0]" in result["roc_auc_note"]


@pytest.mark.parametrize(
    ("gold", "predicted", "scores", "message"),
    [
        ([0, 1], [0], None, "2 gold labels but 1"),
        ([0, 1], [0, 7], None, r"predicted labels \[7\]"),
        ([], [], None, "no rows"),
        ([0, 1, 2], [0, 1, 2], [0.1, 0.2, 0.3], "multi-class scores must have shape"),
    ],
)
def test_malformed_inputs_are_refused(gold, predicted, scores, message) -> None:
    label_values = (0, 1, 2) if len(gold) == 3 else (0, 1)
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(gold, predicted, scores, label_values, None)


def _toy_comments(n: int, seed: int) -> tuple[list[str], list[int]]:
    """A learnable toy task: insults are toxic, pleasantries are not; three in ten are toxic."""
    rng = random.Random(seed)
    insults = ["idiot", "moron", "loser", "stupid", "pathetic", "clown"]
    pleasant = ["thanks", "great", "helpful", "lovely", "agree", "interesting"]
    filler = ["the", "post", "about", "this", "really", "was", "you", "are", "so", "today"]
    texts, labels = [], []
    for _ in range(n):
        toxic = rng.random() < 0.3
        words = [*rng.sample(filler, 4), rng.choice(insults if toxic else pleasant)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(toxic))
    return texts, labels


def test_tfidf_baseline_beats_majority_on_a_learnable_task() -> None:
    train_texts, train_labels = _toy_comments(300, seed=1)
    test_texts, test_labels = _toy_comments(200, seed=2)
    majority = majority_baseline(train_labels, label_values=(0, 1))
    tfidf = tfidf_logreg_baseline(train_texts, train_labels, seed=3, label_values=(0, 1))

    majority_out, tfidf_out = majority(test_texts), tfidf(test_texts)
    assert set(majority_out.labels) == {0}
    assert np.allclose(tfidf_out.probabilities.sum(axis=1), 1.0)
    scores = {
        model.name: evaluate_predictions(test_labels, out.labels, out.scores(1), (0, 1), 1)
        for model, out in ((majority, majority_out), (tfidf, tfidf_out))
    }
    assert scores["tfidf_logreg"]["accuracy"] >= 0.95
    assert scores["tfidf_logreg"]["accuracy"] > scores["majority"]["accuracy"] + 0.15
    assert scores["tfidf_logreg"]["f1"] >= 0.9
    assert scores["majority"]["f1"] == 0.0
    assert scores["majority"]["roc_auc"] == pytest.approx(0.5)  # constant scores rank nothing
    # Deterministic for a seed.
    again = tfidf_logreg_baseline(train_texts, train_labels, seed=3, label_values=(0, 1))(test_texts)
    assert np.array_equal(again.probabilities, tfidf_out.probabilities)


def test_baseline_probability_columns_follow_the_task_label_order() -> None:
    texts, labels = _toy_comments(100, seed=4)
    labels = [5 if v else 2 for v in labels]  # labels that are not column indices
    tfidf = tfidf_logreg_baseline(texts, labels, seed=0, label_values=(5, 2, 9))
    out = tfidf(["you are an idiot", "thanks, that was helpful"])
    assert out.label_values == (5, 2, 9)
    assert out.labels == [5, 2]
    assert out.probabilities[0, 0] > 0.5 and out.probabilities[1, 1] > 0.5
    assert np.all(out.probabilities[:, 2] == 0.0)  # never seen in training
    majority = majority_baseline([2, 2, 5], label_values=(5, 2, 9))
    assert majority.majority_label == 2
    assert majority(["x"]).probabilities.tolist() == [[1 / 3, 2 / 3, 0.0]]


def test_baselines_refuse_what_they_cannot_learn_from() -> None:
    with pytest.raises(ValueError, match="at least two labels"):
        tfidf_logreg_baseline(["a", "b"], [1, 1], seed=0)
    with pytest.raises(ValueError, match="not among"):
        majority_baseline([0, 3], label_values=(0, 1))
    with pytest.raises(ValueError, match="no training labels"):
        majority_baseline([])


def test_agreement_and_kappa_on_known_inputs() -> None:
    # 10 rows, 8 agree. Marginals: a has five 1s, b has five 1s: chance agreement 0.5,
    # so kappa = (0.8 - 0.5) / (1 - 0.5) = 0.6.
    a = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    b = [1, 1, 1, 1, 0, 1, 0, 0, 0, 0]
    result = agreement(a, b)
    assert result == {"agreement": pytest.approx(0.8), "cohen_kappa": pytest.approx(0.6), "rows": 10}
    assert agreement(a, a)["cohen_kappa"] == pytest.approx(1.0)
    assert agreement(a, [1 - v for v in a])["cohen_kappa"] == pytest.approx(-1.0)
    assert agreement([0, 0, 0], [0, 0, 0]) == {"agreement": 1.0, "cohen_kappa": 1.0, "rows": 3}
    with pytest.raises(ValueError):
        agreement([0, 1], [0])
    with pytest.raises(ValueError):
        agreement([], [])


def test_mistakes_table_picks_the_most_confident_errors() -> None:
    texts = [f"text {i}" for i in range(8)]
    gold = [0, 0, 0, 0, 1, 1, 1, 1]
    predicted = [1, 1, 1, 0, 0, 0, 0, 1]
    scores = [0.6, 0.95, 0.8, 0.1, 0.3, 0.05, 0.45, 0.9]
    mistakes = mistakes_table(texts, gold, predicted, scores, positive=1, k=2)
    assert [r["row"] for r in mistakes.false_positives] == [1, 2]
    assert [r["row"] for r in mistakes.false_negatives] == [5, 4]
    assert mistakes.false_positives[0] == {"row": 1, "text": "text 1", "gold": 0, "predicted": 1, "score": 0.95}
    markdown = mistakes.markdown()
    assert "False positives" in markdown and "False negatives" in markdown
    assert "| 1 | text 1 | 0 | 1 | 0.950 |" in markdown

    no_errors = mistakes_table(["a"], [1], [1], [0.9], positive=1, k=5)
    assert no_errors.false_positives == no_errors.false_negatives == []
    assert no_errors.markdown().count("_none_") == 2
    unscored = mistakes_table(texts, gold, predicted, None, positive=1, k=10)
    assert [r["row"] for r in unscored.false_positives] == [0, 1, 2]
    with pytest.raises(ValueError):
        mistakes_table(texts, gold[:-1], predicted, scores, positive=1)


def test_mistakes_table_keeps_hostile_text_in_one_cell() -> None:
    hostile = "line one\n| injected | cells |\n" + "x" * 500
    mistakes = mistakes_table([hostile], [0], [1], [0.9], positive=1, k=1)
    row = next(line for line in mistakes.markdown().splitlines() if line.startswith("| 0 |"))
    assert row.count(" | ") == 4  # five cells: the text's pipes and newlines are escaped
    assert len(row) < 250


def test_comparison_table_has_a_row_per_model_and_a_column_per_metric() -> None:
    results = {
        "student": {"accuracy": 0.91, "f1": 0.8, "roc_auc": 0.95, "agreement": 0.91, "positive": 1},
        "teacher": {"accuracy": 1.0, "f1": 1.0, "roc_auc": None},
        "majority": {"accuracy": 0.7, "f1": 0.0, "roc_auc": 0.5},
        "tfidf_logreg": {"accuracy": 0.85, "f1": 0.7, "roc_auc": 0.9},
    }
    lines = comparison_table(results).splitlines()
    assert lines[0] == "| model | accuracy | f1 | roc_auc | agreement |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| student", "| teacher", "| majority", "| tfidf_logreg"]
    assert lines[2] == "| student | 0.910 | 0.800 | 0.950 | 0.910 |"
    assert lines[3] == "| teacher | 1.000 | 1.000 | – | – |"
    report = comparison_report({"in_distribution": results, "balanced": results})
    assert report.index("#### in_distribution") < report.index("#### balanced")
    assert report.count("| model |") == 2


def test_latency_throughput_measures_each_batch() -> None:
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return list(batch)

    result = latency_throughput(predict, [str(i) for i in range(10)], batch_size=4)
    assert calls == [4, 4, 4, 2]  # one warm-up batch, then every batch timed
    assert result["batches"] == 3 and result["rows"] == 10
    assert 0 <= result["latency_p50_ms"] <= result["latency_p95_ms"]
    assert result["rows_per_s"] > 0
    with pytest.raises(ValueError):
        latency_throughput(predict, [], batch_size=4)


def test_predictions_give_the_positive_column_for_two_labels() -> None:
    probabilities = np.array([[0.2, 0.8], [0.9, 0.1]])
    predictions = Predictions([1, 0], probabilities, (0, 1))
    assert predictions.scores(1).tolist() == [0.8, 0.1]
    assert predictions.scores(0).tolist() == [0.2, 0.9]
    assert predictions.scores(None).tolist() == [0.8, 0.1]
    three = Predictions([0], np.array([[0.5, 0.3, 0.2]]), (0, 1, 2))
    assert three.scores(1).shape == (1, 3)
