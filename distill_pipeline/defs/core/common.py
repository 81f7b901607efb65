"""Small helpers the stage definitions share: scratch space and metadata about published tables."""

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from distill_pipeline.core.store import ObjectStore


@contextmanager
def scratch_dir(context: dg.AssetExecutionContext | dg.OpExecutionContext) -> Iterator[Path]:
    """A temporary directory for DuckDB and Parquet work, removed when the step ends."""
    name = context.asset_key.to_user_string() if isinstance(context, dg.AssetExecutionContext) else context.op.name
    name = name.replace("/", "_")
    with tempfile.TemporaryDirectory(prefix=f"distill-{name}-") as directory:
        yield Path(directory)


def location(store: ObjectStore, key: str) -> dg.MetadataValue:
    """A link to an object in the store, as the UI should show it."""
    url = f"{store.url.rstrip('/')}/{key}"
    return dg.MetadataValue.url(url) if url.startswith("s3://") else dg.MetadataValue.path(url.removeprefix("file://"))
