"""Frozen test sets, and training sets partitioned by size for the data ablation."""

import datetime as dt
import json

import dagster as dg

from distill_pipeline.core.layout import MANIFEST, TEST_SETS_CURRENT, test_sets_prefix, train_set_prefix
from distill_pipeline.core.published import CuratedExamples, TestSets
from distill_pipeline.core.reporting import counts_table, markdown_table
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.tables import MissingTableError, publish_table
from distill_pipeline.data.splitting import TEST_SETS, TrainSize, build_test_sets, build_train_set, find_leakage
from distill_pipeline.defs.core.common import location, scratch_dir
from distill_pipeline.defs.core.partitions import train_sizes
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.core.upstream import upstream
from distill_pipeline.defs.data.conditions import EAGER_BEHIND_CHECKS, ONCE_BEHIND_CHECKS
from distill_pipeline.defs.data.curation import curated_examples

TEST_SET_SIZES_CHECK = "test_set_sizes"
NO_TEST_LEAKAGE_CHECK = "no_test_leakage"


class TestSetsConfig(dg.Config):
    rebuild: bool = False
    """Draw new test sets as a new version. Numbers measured on earlier versions stop being comparable."""


@dg.asset(
    deps=[curated_examples],
    group_name="data",
    kinds={"duckdb", "parquet"},
    automation_condition=ONCE_BEHIND_CHECKS,
    check_specs=[
        dg.AssetCheckSpec(
            TEST_SET_SIZES_CHECK,
            asset="test_sets",
            description="Both test sets have the configured size and the balanced set is balanced.",
        )
    ],
)
def test_sets(
    context: dg.AssetExecutionContext, config: TestSetsConfig, store: StoreResource, task: TaskResource
) -> dg.MaterializeResult:
    """Frozen in-distribution and balanced test sets, made once and reused until explicitly rebuilt."""
    object_store = store.open()
    loaded = task.load()
    frozen = TestSets(object_store)
    pointer = frozen.current()
    if pointer is not None and not config.rebuild:
        manifest = frozen.manifest(pointer["version"])
        context.log.info(f"reusing frozen test sets v{pointer['version']} (set rebuild: true to draw new ones)")
        return _test_sets_result(object_store, manifest, reused=True)
    version = (pointer["version"] + 1) if pointer else 1
    splits = loaded.splits
    with scratch_dir(context) as scratch:
        pool = upstream(context, object_store, CuratedExamples)
        curated = pool.examples(scratch)
        in_distribution, balanced = (scratch / f"{name}.parquet" for name in TEST_SETS)
        stats = build_test_sets(
            curated,
            loaded.label.values,
            in_distribution_size=splits.in_distribution_test_size,
            balanced_size=splits.balanced_test_size,
            seed=splits.seed,
            workdir=scratch / "duckdb",
            in_distribution_path=in_distribution,
            balanced_path=balanced,
        )
        prefix = test_sets_prefix(version)
        manifest = publish_table(
            object_store,
            prefix,
            {path.name: path for path in (in_distribution, balanced)},
            {
                "version": version,
                "task": loaded.id,
                "seed": splits.seed,
                "requested": {
                    "in_distribution": splits.in_distribution_test_size,
                    "balanced": splits.balanced_test_size,
                },
                "curated_manifest": pool.manifest(),
                "stats": {
                    "in_distribution_rows": stats.in_distribution_rows,
                    "balanced_rows": stats.balanced_rows,
                    "in_distribution_labels": stats.in_distribution_labels,
                    "balanced_labels": stats.balanced_labels,
                    "warnings": stats.warnings,
                },
            },
        )
    # The pointer moves last: until then every reader keeps using the previous version.
    object_store.put_bytes(
        TEST_SETS_CURRENT,
        json.dumps({"version": version, "prefix": prefix, "created_at": dt.datetime.now(dt.UTC).isoformat()}).encode(),
    )
    for warning in stats.warnings:
        context.log.warning(warning)
    return _test_sets_result(object_store, manifest, reused=False)


def _test_sets_result(store: ObjectStore, manifest: dict, *, reused: bool) -> dg.MaterializeResult:
    stats = manifest["stats"]
    prefix = test_sets_prefix(manifest["version"])
    requested = manifest["requested"]
    return dg.MaterializeResult(
        metadata={
            "version": manifest["version"],
            "reused_frozen_version": reused,
            "dagster/row_count": stats["in_distribution_rows"] + stats["balanced_rows"],
            "in_distribution_rows": stats["in_distribution_rows"],
            "balanced_rows": stats["balanced_rows"],
            "in_distribution_labels": dg.MetadataValue.md(counts_table(stats["in_distribution_labels"], "label")),
            "balanced_labels": dg.MetadataValue.md(counts_table(stats["balanced_labels"], "label")),
            "files": dg.MetadataValue.md(
                markdown_table(
                    [(name, entry["sha256"][:16], f"{entry['bytes']:,}") for name, entry in manifest["files"].items()],
                    ["file", "sha256", "bytes"],
                )
            ),
            "manifest": location(store, prefix + MANIFEST),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=TEST_SET_SIZES_CHECK,
                passed=not stats["warnings"],
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"warnings": "; ".join(stats["warnings"]) or "none", "requested": json.dumps(requested)},
            )
        ],
    )


@dg.asset(
    deps=[curated_examples, test_sets],
    partitions_def=train_sizes,
    group_name="data",
    kinds={"duckdb", "parquet"},
    automation_condition=EAGER_BEHIND_CHECKS,
    check_specs=[
        dg.AssetCheckSpec(
            NO_TEST_LEAKAGE_CHECK,
            asset="train_sets",
            blocking=True,
            description="No training row shares a request id or a normalised text with a frozen test row.",
        )
    ],
)
def train_sets(context: dg.AssetExecutionContext, store: StoreResource, task: TaskResource) -> dg.MaterializeResult:
    """A training set of the partition's size, nested in every larger one, disjoint from the test sets."""
    object_store = store.open()
    loaded = task.load()
    size = TrainSize.from_key(context.partition_key)
    pool, frozen = upstream(context, object_store, CuratedExamples), upstream(context, object_store, TestSets)
    try:
        pointer = frozen.require_current()
    except MissingTableError as exc:
        raise dg.Failure(str(exc)) from exc
    with scratch_dir(context) as scratch:
        curated = pool.examples(scratch)
        tests = [frozen.table(pointer, name, scratch) for name in TEST_SETS]
        train = scratch / "train.parquet"
        stats = build_train_set(
            curated, tests, size, seed=loaded.splits.seed, workdir=scratch / "duckdb", train_path=train
        )
        # Checked again on the written file, independently of how it was built.
        leakage = find_leakage(train, tests)
        prefix = train_set_prefix(size.key)
        publish_table(
            object_store,
            prefix,
            {"train.parquet": train},
            {
                "size": size.key,
                "test_sets_version": pointer["version"],
                "curated_sha256": pool.manifest()["files"]["examples.parquet"]["sha256"],
                "seed": loaded.splits.seed,
                "stats": {"rows": stats.rows, "pool_rows": stats.pool_rows, "label_counts": stats.label_counts},
            },
        )
    for warning in stats.warnings:
        context.log.warning(warning)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": stats.rows,
            "size": size.key,
            "pool_rows": stats.pool_rows,
            "share_of_pool": float(stats.rows / stats.pool_rows) if stats.pool_rows else 0.0,
            "excluded_test_rows_by_id": stats.excluded_by_id,
            "excluded_test_rows_by_text": stats.excluded_by_text,
            "test_sets_version": pointer["version"],
            "label_distribution": dg.MetadataValue.md(counts_table(stats.label_counts, loaded.label.field)),
            "table": location(object_store, prefix + "train.parquet"),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=NO_TEST_LEAKAGE_CHECK,
                passed=leakage.total == 0,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"leaked_by_id": leakage.by_id, "leaked_by_text": leakage.by_text},
            )
        ],
    )
