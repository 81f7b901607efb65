"""Training-size ablation: learning-curve fits, the doubling gain, and the recommendation."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from distill_pipeline.students import ablation
from distill_pipeline.students.ablation import analyse_ablation, fit_learning_curve, recommendation

SIZES = [500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000]


def power_law(n, a: float, b: float, c: float):
    return a - b * np.asarray(n, dtype=float) ** -c


def test_power_law_fit_recovers_a_known_curve_from_noisy_points() -> None:
    rng = np.random.default_rng(0)
    accuracies = power_law(SIZES, 0.92, 1.5, 0.4) + rng.normal(0, 0.001, len(SIZES))
    curve = fit_learning_curve(SIZES, accuracies)
    assert curve.kind == "power_law"
    assert curve.a == pytest.approx(0.92, abs=0.01)
    assert curve.c == pytest.approx(0.4, abs=0.05)
    assert curve.b == pytest.approx(1.5, rel=0.25)
    true_gain = 1.5 * 32_000**-0.4 * (1 - 2**-0.4)  # acc(2N) - acc(N), about 0.57 points
    assert curve.doubling_gain(32_000) == pytest.approx(true_gain, abs=0.001)


def test_exact_power_law_gives_its_parameters_and_doubling_gain() -> None:
    curve = fit_learning_curve(SIZES, power_law(SIZES, 0.85, 2.0, 0.3))
    assert (curve.a, curve.b, curve.c) == pytest.approx((0.85, 2.0, 0.3), rel=1e-3)
    assert curve.doubling_gain(32_000) == pytest.approx(2.0 * 32_000**-0.3 * (1 - 2**-0.3), rel=1e-3)


def test_too_few_sizes_fall_back_to_log_linear_and_say_so() -> None:
    sizes = [1_000, 4_000, 16_000]
    accuracies = [0.70 + 0.02 * np.log(n) for n in sizes]
    curve = fit_learning_curve(sizes, accuracies)
    assert curve.kind == "log_linear"
    assert "only 3 sizes" in curve.reason
    assert (curve.a, curve.b) == pytest.approx((0.70, 0.02))
    assert curve.doubling_gain(16_000) == pytest.approx(0.02 * np.log(2))


def test_a_failed_power_law_fit_falls_back_to_log_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.optimize

    def failing_curve_fit(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(scipy.optimize, "curve_fit", failing_curve_fit)
    curve = fit_learning_curve(SIZES, power_law(SIZES, 0.9, 1.0, 0.5))
    assert curve.kind == "log_linear"
    assert "power-law fit failed" in curve.reason and "Optimal parameters not found" in curve.reason


def test_one_size_cannot_be_fitted() -> None:
    with pytest.raises(ValueError, match="two distinct"):
        fit_learning_curve([1_000, 1_000], [0.8, 0.81])


def test_recommendation_switches_at_the_threshold() -> None:
    worth, text = recommendation({"in_distribution": 0.2, "balanced": 0.5}, 10_000, threshold_points=0.5)
    assert worth
    assert text.startswith("More data is worth it: doubling the training set from 10,000 to 20,000 rows")
    assert "+0.50 points on the balanced set (+0.20 on the in-distribution set)" in text

    worth, text = recommendation({"in_distribution": 0.2, "balanced": 0.49}, 10_000, threshold_points=0.5)
    assert not worth
    assert text.startswith("Diminishing returns:")
    assert "less than 0.50 points" in text and "+0.49 on the balanced set" in text


def test_analysis_of_a_steep_curve_recommends_more_data() -> None:
    points = [(n, power_law(n, 0.95, 0.5, 0.3), power_law(n, 0.9, 2.0, 0.3)) for n in SIZES]
    analysis = analyse_ablation(points)
    expected_balanced = 100 * 2.0 * 32_000**-0.3 * (1 - 2**-0.3)  # about 1.66 points
    assert analysis.doubling_gain_points["balanced"] == pytest.approx(expected_balanced, rel=0.01)
    assert analysis.worthwhile is True
    assert f"+{expected_balanced:.2f} points on the balanced set" in analysis.recommendation
    assert "Fits: in-distribution set: power law over 7 sizes" in analysis.recommendation


def test_analysis_of_a_flat_curve_reports_diminishing_returns() -> None:
    points = [(n, power_law(n, 0.95, 0.3, 0.6), power_law(n, 0.9, 0.3, 0.6)) for n in SIZES]
    analysis = analyse_ablation(points, threshold_points=0.3)
    assert max(analysis.doubling_gain_points.values()) < 0.3
    assert analysis.worthwhile is False
    assert analysis.recommendation.startswith("Diminishing returns")


def test_analysis_with_one_size_cannot_judge() -> None:
    analysis = analyse_ablation([(5_000, 0.8, 0.7)])
    assert analysis.worthwhile is None
    assert analysis.recommendation.startswith("Cannot judge")
    assert analysis.curves == {}


@pytest.mark.parametrize(
    "bad",
    [[(0, 0.8, 0.7), (10, 0.9, 0.8)], [(10, 85.0, 70.0), (20, 90.0, 80.0)], [(10, float("nan"), 0.7), (20, 0.8, 0.8)]],
)
def test_malformed_points_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        analyse_ablation(bad)


def test_plot_and_markdown_embed_a_png() -> None:
    points = [(n, power_law(n, 0.95, 0.5, 0.3), power_law(n, 0.9, 2.0, 0.3)) for n in SIZES[:3]]
    analysis = analyse_ablation(list(reversed(points)))  # order does not matter
    assert [p.train_rows for p in analysis.points] == SIZES[:3]
    plot = analysis.plot_markdown()
    assert plot.startswith("![Accuracy vs training-set size](data:image/png;base64,")
    assert base64.b64decode(plot.split("base64,", 1)[1].rstrip(")")).startswith(b"\x89PNG")
    markdown = analysis.markdown()
    assert markdown.startswith(f"**{analysis.recommendation}**")
    assert "| 2,000 |" in markdown and "log-linear" in markdown


def test_the_power_law_needs_one_more_size_than_parameters() -> None:
    assert ablation.POWER_LAW_MIN_SIZES == 4
    sizes = SIZES[:4]
    assert fit_learning_curve(sizes, power_law(sizes, 0.9, 1.0, 0.5)).kind == "power_law"


def _correct(accuracies: list[float], rows: int, rng: np.random.Generator) -> np.ndarray:
    """Per-row results of nested students: each size right on the rows the smaller one got right, and more."""
    order = rng.permutation(rows)
    matrix = np.zeros((len(accuracies), rows), dtype=bool)
    for i, accuracy in enumerate(accuracies):
        matrix[i, order[: round(accuracy * rows)]] = True
    return matrix


def test_a_gain_whose_interval_includes_zero_is_inside_the_noise() -> None:
    rng = np.random.default_rng(0)
    sizes = SIZES[:5]
    # A flat, noisy curve measured on 200 rows: the expected gain cannot be told from zero.
    accuracies = [0.80, 0.81, 0.805, 0.81, 0.815]
    # Each size's mistakes on rows of their own, as separately trained students make them.
    correct = {name: np.array([rng.random(200) < a for a in accuracies]) for name in ("in_distribution", "balanced")}
    points = [(n, correct["in_distribution"][i].mean(), correct["balanced"][i].mean()) for i, n in enumerate(sizes)]
    analysis = analyse_ablation(points, correct=correct, resamples=60)
    for low, high in analysis.gain_intervals.values():
        assert low < ablation.GAIN_RESOLUTION_POINTS < high
    assert analysis.worthwhile is False
    assert analysis.recommendation.startswith("Inside the noise")
    assert analysis.accuracy_intervals["balanced"][0][0] < points[0][2] < analysis.accuracy_intervals["balanced"][0][1]
    assert "95% interval" in analysis.markdown() and "[0." in analysis.markdown()


def test_a_steep_curve_on_many_rows_is_worth_more_data_with_its_interval() -> None:
    rng = np.random.default_rng(1)
    sizes = SIZES[:5]
    accuracies = [float(power_law(n, 0.95, 2.0, 0.3)) for n in sizes]
    correct = {name: _correct(accuracies, 20_000, rng) for name in ("in_distribution", "balanced")}
    points = [(n, correct["in_distribution"][i].mean(), correct["balanced"][i].mean()) for i, n in enumerate(sizes)]
    analysis = analyse_ablation(points, correct=correct, resamples=60)
    assert analysis.worthwhile is True
    low, high = analysis.gain_intervals["in_distribution"]
    assert 0.5 < low <= analysis.doubling_gain_points["in_distribution"] <= high
    assert "(95% interval" in analysis.recommendation
    with pytest.raises(ValueError, match="do not give the stated accuracies"):
        analyse_ablation([(n, 0.5, 0.5) for n in sizes], correct=correct)
