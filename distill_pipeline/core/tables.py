"""Publishing and fetching a stage's Parquet tables in the store, with a manifest written last."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill_pipeline.core.layout import MANIFEST
from distill_pipeline.core.store import ObjectNotFound, ObjectStore, file_sha256


def publish_table(store: ObjectStore, prefix: str, files: dict[str, Path], manifest: dict[str, Any]) -> dict[str, Any]:
    """Upload ``files`` under ``prefix``, then the manifest naming them with their hashes.

    A reader trusts a prefix only once its manifest exists and checks the hashes, so a crash
    half-way leaves the previous complete version (or nothing) visible, never a mix.
    """
    entries = {}
    for name, path in files.items():
        store.put_file(prefix + name, path)
        entries[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    full = {"published_at": dt.datetime.now(dt.UTC).isoformat(), "files": entries, **manifest}
    store.put_bytes(prefix + MANIFEST, json.dumps(full, indent=2, sort_keys=True, default=str).encode())
    return full


def read_pointer(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """A small JSON object the pipeline publishes (a manifest, a ``current.json`` pointer), or None
    where none has been written yet."""
    try:
        return json.loads(store.get_bytes(key))
    except ObjectNotFound:
        return None


def read_manifest(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    return read_pointer(store, prefix + MANIFEST)


class MissingTableError(RuntimeError):
    """An upstream table has not been published (materialise the upstream asset first)."""


def fetch_table(store: ObjectStore, prefix: str, name: str, directory: Path) -> Path:
    """Download a published table file and check it against its manifest."""
    manifest = read_manifest(store, prefix)
    if manifest is None or name not in manifest.get("files", {}):
        raise MissingTableError(f"no published table {prefix}{name} in {store.url}")
    local = directory / prefix.strip("/").replace("/", "__") / name
    store.get_file(prefix + name, local)
    expected = manifest["files"][name]["sha256"]
    if file_sha256(local) != expected:
        raise MissingTableError(f"{prefix}{name} does not match its manifest (being rewritten?); retry")
    return local


def publish_report(
    store: ObjectStore,
    prefix: str,
    report: Mapping[str, Any],
    markdown: str,
    manifest: Mapping[str, Any],
    files: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """``report.json`` and ``report.md`` under ``prefix`` (with any other ``files``), manifest last."""
    with tempfile.TemporaryDirectory(prefix="distill-report-") as directory:
        json_path, md_path = Path(directory) / "report.json", Path(directory) / "report.md"
        json_path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        md_path.write_text(markdown + "\n")
        published = {**(files or {}), "report.json": json_path, "report.md": md_path}
        return publish_table(store, prefix, published, dict(manifest))


def read_report(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    """A published report.json, or None before one exists."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        return None
    data = store.get_bytes(prefix + "report.json")
    if hashlib.sha256(data).hexdigest() != manifest["files"]["report.json"]["sha256"]:
        raise ValueError(f"{prefix}report.json does not match its manifest (being rewritten?); retry")
    return json.loads(data)
