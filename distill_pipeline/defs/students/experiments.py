"""The experiments report: every student variant at every training-set size, on both frozen test sets."""

import dagster as dg

from distill_pipeline.core.layout import EXPERIMENTS_PREFIX
from distill_pipeline.core.tables import publish_report
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.students.assets import EVERY_SIZES_REPORT, Evaluated, current_eval_reports
from distill_pipeline.students.experiments import DEFAULT_USD_PER_HOUR, ExperimentRun, compare_experiments, cost_per_1k
from distill_pipeline.students.promotion import Labels


class ExperimentsConfig(dg.Config):
    usd_per_hour: float = DEFAULT_USD_PER_HOUR
    """What an hour of the machine that serves the student costs (US dollars): prices a thousand predictions."""


def _run(entry: Evaluated, change: str) -> ExperimentRun:
    report = entry.report
    speed = report["speed"]
    return ExperimentRun(
        entry.size,
        entry.variant,
        change,
        report["train_id"],
        report["adapter_prefix"],
        report["train_rows"],
        {name: entry.student(name) for name in entry.rows},
        report.get("train_seconds"),
        report.get("trainable_parameters"),
        speed["single_request"]["latency_p50_ms"],
        speed["batched"]["rows_per_s"],
    )


@dg.asset(deps=EVERY_SIZES_REPORT, group_name="students", kinds={"scipy"})
def experiments_report(
    context: dg.AssetExecutionContext, config: ExperimentsConfig, store: StoreResource, task: TaskResource
) -> dg.MaterializeResult:
    """Every variant x size side by side with intervals, costs and paired comparisons to base, and the one to use."""
    object_store = store.open()
    loaded = task.load()
    promotion = loaded.promotion
    with scratch_dir(context) as scratch:
        version, evaluated = current_eval_reports(context, object_store, scratch)
    runs = []
    for entry in evaluated:
        if entry.variant in loaded.variants:
            change = loaded.variant(entry.variant).change()
        else:
            change = entry.report.get("variant_change", "(no longer in the task)")
        runs.append(_run(entry, change))
    truth = {name: rows.labels for name, rows in evaluated[0].rows.items()}
    if config.usd_per_hour <= 0:
        raise dg.Failure(f"usd_per_hour must be positive, not {config.usd_per_hour}")
    report = compare_experiments(
        runs,
        truth,
        Labels(tuple(loaded.label.values), loaded.label.positive),
        alpha=promotion.alpha,
        usd_per_hour=config.usd_per_hour,
        resamples=promotion.resamples,
        seed=promotion.seed,
    )
    summary = {"test_sets_version": version, **report.to_dict()}
    publish_report(
        object_store,
        EXPERIMENTS_PREFIX,
        summary,
        report.markdown(),
        {"test_sets_version": version, "runs": [run.name for run in report.runs]},
    )
    numbers: dict[str, float] = {}
    for run in report.runs:
        for test_set, metrics in report.scores[run.name].items():
            for metric, interval in metrics.items():
                key = f"{run.size_key}_{run.variant}_{metric}_{test_set}"
                numbers |= {key: interval.estimate, f"{key}_low": interval.low, f"{key}_high": interval.high}
        cost = cost_per_1k(run.rows_per_s, report.usd_per_hour)
        if cost is not None:
            numbers[f"{run.size_key}_{run.variant}_usd_per_1k"] = cost
    return dg.MaterializeResult(
        metadata={
            "recommendation": dg.MetadataValue.md(report.recommendation),
            "recommended_size": report.choice.chosen.size_key,
            "recommended_variant": report.choice.chosen.variant,
            "best": report.choice.best.name,
            "tied_with_best": ", ".join(c.name for c in report.choice.tied),
            "runs": len(report.runs),
            "experiments": dg.MetadataValue.md(report.table()),
            **{name: float(value) for name, value in numbers.items()},
            "report": location(object_store, EXPERIMENTS_PREFIX + "report.md"),
        }
    )
