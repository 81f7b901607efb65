"""Synthetic examples: rewrites through the test server, near-duplicate filtering, labels, the asset."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.core.layout import CURATED_PREFIX, SYNTHETIC_PREFIX
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.tables import publish_table
from distill_pipeline.core.task import load_task
from distill_pipeline.defs.core.resources import StoreResource, TaskResource
from distill_pipeline.defs.data.curation import curated_examples
from distill_pipeline.defs.teachers.assets import synthetic_examples
from distill_pipeline.defs.teachers.resources import TeacherResource
from distill_pipeline.teachers.client import ClientSettings, TeacherClient, TeacherSpec
from distill_pipeline.teachers.ledger import Ledger
from distill_pipeline.teachers.synthetic import (
    Seed,
    distinct_bigram_ratio,
    make_synthetic_examples,
    rewrite_template,
    variations_for,
)
from distill_pipeline_tests.openai_server import control, server_stats

TASK = load_task("toxicity")
SEEDS = [
    Seed("r1", "you are an idiot and your edits are garbage"),
    Seed("r2", "thanks for fixing the citation on this page"),
]


def rewrites_script() -> tuple[list[dict], dict[tuple[str, str], str]]:
    """Three rewrites per seed: one fine, one the seed again, one nearly the first rewrite."""
    replies = {
        "r1": ["what an idiot, every single edit you make is trash", "you are an idiot and your edits are garbage",
               "what an idiot, every single edit you make is pure trash"],
        "r2": ["much appreciated that you repaired the reference here", "Cheers! Citation fixed, nice work mate",
               "'  Thank you kindly for correcting that source.  '"],
    }  # fmt: skip
    script, planned = [], {}
    for seed in SEEDS:
        for variation, reply in zip(variations_for(seed, TASK.synthetic), replies[seed.request_id], strict=True):
            content = rewrite_template(TASK.synthetic, variation).render(seed.input)
            script.append({"model": "writer", "content": content, "response": reply})
            planned[(seed.request_id, variation)] = reply
    return script, planned


def test_diversity_measure():
    # Word similarity (jaccard, word_set) is core.normalise's, tested in test_normalise.py.
    assert distinct_bigram_ratio(["a b a b"]) == pytest.approx(2 / 3)


def test_rewrites_are_filtered_and_labelled(teacher_url, tmp_path):
    script, _ = rewrites_script()
    control(teacher_url, script=script)
    ledger = Ledger.open(LocalStore(tmp_path / "store"), tmp_path / "journal")
    client = TeacherClient(ClientSettings(api_base=teacher_url + "/v1", api_key="sk-test"), ledger)
    rewriter, labeller = TeacherSpec("openai/writer", "rewrite", 0.9, 200), TeacherSpec("openai/judge")
    result = make_synthetic_examples(client, rewriter, labeller, TASK, SEEDS)
    assert result.removed_by_reason == {"same words as the seed": 1, "too close to another rewrite of its seed": 1}
    kept = {row["input"]: row for row in result.kept}
    assert set(kept) == {
        "what an idiot, every single edit you make is trash",
        "much appreciated that you repaired the reference here",
        "Cheers! Citation fixed, nice work mate",
        "Thank you kindly for correcting that source.",
    }
    assert kept["what an idiot, every single edit you make is trash"]["label"] == 1
    assert kept["Cheers! Citation fixed, nice work mate"]["label"] == 0
    assert all(
        row["request_id"].startswith("synthetic-") and row["rewritten_by"] == "openai/writer" for row in kept.values()
    )
    # Six rewrites and four labels were paid; a second run pays nothing.
    assert server_stats(teacher_url)["paid"] == 10
    make_synthetic_examples(client, rewriter, labeller, TASK, SEEDS)
    assert server_stats(teacher_url)["paid"] == 10


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def test_synthetic_examples_asset(teacher_url, tmp_path, instance):
    script, _ = rewrites_script()
    control(teacher_url, script=script)
    store = LocalStore(tmp_path / "store")
    curated = tmp_path / "examples.parquet"
    pq.write_table(pa.table({"request_id": ["r1", "r2"], "input": [s.input for s in SEEDS], "label": [1, 0]}), curated)
    publish_table(store, CURATED_PREFIX, {"examples.parquet": curated}, {})
    resource = TeacherResource(models=["openai/judge"], api_base=teacher_url + "/v1", api_key="sk-test",
                               journal_dir=str(tmp_path / "journal"))  # fmt: skip
    result = dg.materialize(
        [curated_examples, synthetic_examples],
        selection=["synthetic_examples"],
        resources={"store": StoreResource(url=store.url), "task": TaskResource(name="toxicity"), "teacher": resource},
        instance=instance,
        run_config={"ops": {"synthetic_examples": {"config": {"seeds": 2, "rewriter": "openai/writer"}}}},
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("synthetic_examples")
    meta = {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    assert (meta["seeds"], meta["candidates"], meta["kept"], meta["removed"]) == (2, 6, 4, 2)
    table = store.root / SYNTHETIC_PREFIX / "examples.parquet"
    assert duckdb.connect().sql(f"SELECT count(*), min(label), max(label) FROM '{table}'").fetchall() == [(4, 0, 1)]
