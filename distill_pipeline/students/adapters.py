"""Adapters in the store: published with a manifest, pointed at per size, fetched and checked."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill_pipeline.core.errors import UsageError
from distill_pipeline.core.layout import MANIFEST, adapter_pointer
from distill_pipeline.core.published import Champion
from distill_pipeline.core.store import ObjectStore, file_sha256
from distill_pipeline.core.tables import publish_table, read_manifest
from distill_pipeline.core.task import BASE_VARIANT

ADAPTER_DIR = "adapter"
#: Every adapter folder the trainer writes holds this, a LoRA adapter's and a full fine-tune's alike.
STUDENT_FILE = "student.json"
#: The trainer's records published beside the adapter (see trainer/train.py).
RUN_FILES = ("spec.json", "result.json", "metrics.jsonl", "data_hashes.json")


def publish_adapter(store: ObjectStore, prefix: str, run_dir: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Upload a finished run (``adapter/`` and the run records) under ``prefix``, manifest last."""
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / STUDENT_FILE).is_file():
        raise FileNotFoundError(f"{adapter} holds no {STUDENT_FILE}: the training run did not finish")
    files = {f"{ADAPTER_DIR}/{p.relative_to(adapter).as_posix()}": p for p in sorted(adapter.rglob("*")) if p.is_file()}
    files |= {name: run_dir / name for name in RUN_FILES if (run_dir / name).is_file()}
    return publish_table(store, prefix, files, dict(manifest))


def point_at_adapter(store: ObjectStore, size_key: str, prefix: str, train: str, variant: str = BASE_VARIANT) -> None:
    """Make ``prefix`` the size and variant's current adapter (after its manifest is written)."""
    store.put_bytes(adapter_pointer(size_key, variant), json.dumps({"prefix": prefix, "train_id": train}).encode())


def fetch_published(store: ObjectStore, prefix: str, directory: Path, *, under: str = "") -> Path:
    """Download the manifest's files under ``prefix`` (those starting with ``under``) into
    ``directory``, each checked against its SHA-256; returns ``directory``."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise FileNotFoundError(f"nothing published under {prefix} in {store.url} (no {MANIFEST})")
    for name, entry in manifest["files"].items():
        if not name.startswith(under):
            continue
        local = directory / name
        store.get_file(prefix + name, local)
        if file_sha256(local) != entry["sha256"]:
            raise ValueError(f"{prefix}{name} does not match its manifest (being rewritten?); retry")
    return directory


def fetch_adapter(store: ObjectStore, prefix: str, directory: Path) -> Path:
    """A published adapter as a local ``adapter/`` folder that ``load_student`` reads."""
    return fetch_published(store, prefix, directory, under=f"{ADAPTER_DIR}/") / ADAPTER_DIR


def resolve_adapter(reference: str, store: ObjectStore | None, directory: Path) -> Path:
    """A local adapter folder from what a user names.

    ``reference`` is a local folder (an ``adapter/`` folder or a run folder holding one), a
    published adapter prefix in ``store`` (``students/adapters/size=100pct/<id>/``), or
    ``champion`` for the current champion. A reference that is a path (it exists here, or is
    written like one: absolute, ``~``, ``.`` or ``..`` parts) is never looked up in the store.
    """
    local = Path(reference).expanduser()
    for candidate in (local, local / ADAPTER_DIR):
        if (candidate / STUDENT_FILE).is_file():
            return candidate
    if local.exists():
        raise UsageError(
            f"{reference} is not an adapter folder: it holds no {STUDENT_FILE} (nor {ADAPTER_DIR}/{STUDENT_FILE})"
        )
    written_as_path = local.is_absolute() or any(part in ("", ".", "..") for part in reference.rstrip("/").split("/"))
    if store is None or written_as_path:
        raise UsageError(
            f"no adapter {reference!r}: no such folder here; name an adapter folder, a published adapter "
            "prefix (students/adapters/size=KEY/ID/) or champion"
        )
    if reference == "champion":
        champion = Champion(store).current()
        if champion is None:
            raise UsageError(f"no champion in {store.url} yet: name an adapter folder or a published adapter prefix")
        reference = champion["adapter_prefix"]
    try:
        return fetch_adapter(store, reference.rstrip("/") + "/", directory)
    except FileNotFoundError as exc:
        raise UsageError(
            f"no adapter {reference!r}: no such folder here, and {exc}; name an adapter folder, a published "
            "adapter prefix (students/adapters/size=KEY/ID/) or champion"
        ) from exc


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The trainer's metrics.jsonl: train lines carry ``loss``, validation lines ``val_loss``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
