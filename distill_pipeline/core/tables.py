"""Publishing and fetching a stage's Parquet tables in the store, with a manifest written last."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from distill_pipeline.core.layout import MANIFEST
from distill_pipeline.core.store import ObjectNotFound, ObjectStore


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


def read_manifest(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(prefix + MANIFEST))
    except ObjectNotFound:
        return None


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


def published_partitions(store: ObjectStore, root: str, key_name: str = "dt") -> list[str]:
    """Partition values under ``root`` (``<root><key_name>=<value>/``) that have a manifest."""
    values = set()
    for info in store.list(root):
        relative = info.key[len(root) :]
        head, _, rest = relative.partition("/")
        if rest == MANIFEST and head.startswith(f"{key_name}="):
            values.add(head.split("=", 1)[1])
    return sorted(values)
