"""Reads follow lineage: an asset reads an upstream only through the accessor of a declared dependency."""

from pathlib import Path

import dagster as dg

from distill_pipeline.core.published import CuratedExamples, TeacherLabels
from distill_pipeline.core.store import LocalStore
from distill_pipeline.defs.core.upstream import fan_in_keys, upstream

days = dg.StaticPartitionsDefinition(["2026-01-01", "2026-01-02", "2026-01-03"])
teacher_labels = dg.AssetSpec("teacher_labels", partitions_def=days)
curated_examples = dg.AssetSpec("curated_examples")


def _run(asset: dg.AssetsDefinition, store: LocalStore) -> dg.ExecuteInProcessResult:
    return dg.materialize([teacher_labels, curated_examples, asset], selection=[asset], raise_on_error=False)


def test_an_undeclared_upstream_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")

    @dg.asset(deps=[teacher_labels])
    def reads_what_it_does_not_declare(context: dg.AssetExecutionContext) -> None:
        upstream(context, store, CuratedExamples)

    result = _run(reads_what_it_does_not_declare, store)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "reads curated_examples without declaring it as a dependency" in failure.step_failure_data.error.message


def test_fan_in_reads_the_mapped_partitions_that_were_published(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    # Only two of the three mapped days have published labels (a manifest).
    for day in ("2026-01-01", "2026-01-03"):
        store.put_bytes(f"tables/teacher_labels/dt={day}/_manifest.json", b'{"files": {}}')
    seen: list[list[str]] = []

    @dg.asset(deps=[dg.AssetDep(teacher_labels, partition_mapping=dg.AllPartitionMapping())])
    def fan_in(context: dg.AssetExecutionContext) -> None:
        labels = upstream(context, store, TeacherLabels)
        seen.append(labels.published_days(fan_in_keys(context, TeacherLabels)))

    assert _run(fan_in, store).success
    assert seen == [["2026-01-01", "2026-01-03"]]

