"""The object store every stage reads from and writes to: a local directory or an S3 bucket.

A store is addressed by one URL (``DISTILL_STORE``): a plain path or ``file://`` URL for the
local default, ``s3://bucket/prefix`` for S3 and S3-compatible servers (MinIO, ...), whose
endpoint comes from ``endpoint_url`` or ``AWS_ENDPOINT_URL``. Keys are ``/``-separated and
relative to the store's root, so a layout is the same on both.

A store's contents may be hostile (anyone who can write to the bucket or the folder can put
anything there), so a key that cannot be used safely raises :class:`UnsafeKey` rather than
reaching outside the store: a malformed key (a bucket may hold ``logs/../../x`` and list it), and,
in the local store, a key whose real path leaves the root through a symlink. Readers that take
whole objects into memory cap them with ``get_bytes(key, max_bytes=...)``.

Writes are atomic per object: the local store writes a temporary file and renames it; S3 puts
are atomic by nature. Multi-object outputs are published by writing their manifest last.
:func:`atomic_file` is the package's one atomic local write and :func:`file_sha256` its one file
hash (only the standalone trainer keeps copies of its own).

S3 calls are retried by botocore alone (:data:`S3_RETRY_CONFIG`, given to every client the
pipeline makes), never by a loop around them: a loop around a retrying client multiplies the
attempts and fights a throttled bucket instead of backing off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlparse

DEFAULT_LOCAL_STORE = ".distill_store"

#: botocore's retry policy for S3: "standard" mode backs off exponentially with full jitter
#: (from 1 s for throttling such as 503 SlowDown, honouring ``x-amz-retry-after``; from 50 ms for
#: other 5xx and dropped connections; at most 20 s a wait) and never retries a 4xx such as 403.
#: "standard" rather than "adaptive" because it is the mode dagster-aws's S3Resource configures,
#: so both ways of making a client retry alike. The attempts count the first call.
S3_MAX_ATTEMPTS = 10
S3_RETRY_CONFIG = {"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}


class ObjectNotFound(KeyError):
    """The key does not exist in the store."""


class UnsafeKey(ValueError):
    """A key the store will not use: ``why`` says what is wrong with it."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{why}: {key!r}")
        self.key, self.why = key, why


class ObjectTooLarge(Exception):
    """An object holds more bytes than its reader accepts."""

    def __init__(self, key: str, max_bytes: int) -> None:
        super().__init__(f"object {key!r} holds more than {max_bytes} bytes")
        self.key, self.max_bytes = key, max_bytes


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # An opaque version tag that changes when the object's bytes change (S3 ETag, or the
    # local file's mtime and size); sensors use it to notice rewritten objects.
    version: str
    # When the object was last written, in seconds since the epoch.
    modified: float


class ObjectStore(Protocol):
    """The few operations the pipeline needs from a blob store."""

    @property
    def url(self) -> str: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; :class:`ObjectTooLarge` without reading them when it holds more than ``max_bytes``."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_file(self, key: str, path: Path) -> None: ...


def _check_key(key: str) -> str:
    # An empty part also rules out "", "/abs" and "dir/": on S3 "dir/" is a key of its own,
    # in a directory it would alias "dir".
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise UnsafeKey(key, "invalid store key")
    return key


def _check_prefix(prefix: str) -> str:
    """A list prefix: like a key, except that it may be empty or end in "/" or mid-name."""
    if any(part in ("", ".", "..") for part in prefix.split("/")[:-1]):
        raise UnsafeKey(prefix, "invalid store prefix")
    return prefix


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` whole or not at all: written beside it, synced, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="." + path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class LocalStore:
    """A directory on the local file system.

    A symlink in the directory is followed only while it stays under the root: a key whose real
    path leads outside is refused for reading and writing alike (a symlinked folder of tables
    would otherwise take the pipeline's writes elsewhere, a symlinked log object another file's
    bytes into a quarantine excerpt), and a listing never offers one. This guards against links
    already in the store, not against someone swapping links in while the store works.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        # The path as written, not the real one: deleting or replacing a symlinked key acts on
        # the link, never on the object it names.
        path = self.root / _check_key(key)
        if not self._is_inside(path):
            raise UnsafeKey(key, "store key leads outside the store root through a symlink")
        return path

    def _is_inside(self, path: Path) -> bool:
        """Whether ``path``, every symlink on its way followed, stays under the root."""
        return Path(os.path.realpath(path)).is_relative_to(self.root)

    def _object_stat(self, path: Path) -> os.stat_result | None:
        """The stat of the object at ``path`` when it is a regular file under the root (a symlink
        to one counts); None for anything else: a dangling or looping link, a link leading
        outside, a FIFO that would block its reader."""
        try:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                if not self._is_inside(path):
                    return None
                info = path.stat()
        except OSError:
            return None
        return info if stat.S_ISREG(info.st_mode) else None

    def put_bytes(self, key: str, data: bytes) -> None:
        with atomic_file(self._path(key)) as handle:
            handle.write(data)

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        with open(path, "rb") as source, atomic_file(target) as handle:
            shutil.copyfileobj(source, handle, 1 << 22)

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as handle:
                if max_bytes is None:
                    return handle.read()
                if os.fstat(handle.fileno()).st_size > max_bytes:
                    raise ObjectTooLarge(key, max_bytes)
                # Read one byte past the cap: a file may grow after its size was taken.
                data = handle.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        if len(data) > max_bytes:
            raise ObjectTooLarge(key, max_bytes)
        return data

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        with open(source, "rb") as src, atomic_file(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[ObjectInfo]:
        # A prefix may end inside a file name (``logs/dt=2024``), so walk from its directory.
        # The walk starts only from a directory that really is under the root, and never
        # descends into a symlinked one (os.walk's default: following could leave the root,
        # list a subtree twice, or loop).
        _check_prefix(prefix)
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir() or not self._is_inside(base):
            return []
        found = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(".tmp-"):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix) and (info := self._object_stat(full)) is not None:
                    found.append(ObjectInfo(key, info.st_size, f"{info.st_mtime_ns}-{info.st_size}", info.st_mtime))
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)


class S3Store:
    """A bucket and key prefix on S3 or any S3-compatible server."""

    def __init__(
        self, bucket: str, prefix: str = "", client: Any | None = None, endpoint_url: str | None = None
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            client = make_s3_client(endpoint_url)
        self.client = client

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise ObjectNotFound(key) from None
            raise
        body = response["Body"]
        # botocore's body reads exactly ContentLength bytes (it raises on a short or long body),
        # so checking the header caps the read.
        if max_bytes is not None and response["ContentLength"] > max_bytes:
            body.close()
            raise ObjectTooLarge(key, max_bytes)
        return body.read()

    def get_file(self, key: str, path: Path) -> None:
        if not self.exists(key):
            raise ObjectNotFound(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(key), str(path))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise

    def _pages(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        yield from paginator.paginate(Bucket=self.bucket, Prefix=full_prefix)

    def list(self, prefix: str) -> list[ObjectInfo]:
        _check_prefix(prefix)
        found = []
        for page in self._pages(prefix):
            for item in page.get("Contents", []):
                found.append(
                    ObjectInfo(
                        self._relative(item["Key"]),
                        int(item["Size"]),
                        item["ETag"].strip('"'),
                        item["LastModified"].timestamp(),
                    )
                )
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def make_s3_client(endpoint_url: str | None = None, region_name: str | None = None) -> Any:
    """A boto3 S3 client retrying by :data:`S3_RETRY_CONFIG`; credentials come from the usual AWS chain."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=region_name or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(retries=dict(S3_RETRY_CONFIG)),
    )


def open_store(url: str | None = None, *, s3_client: Any | None = None, endpoint_url: str | None = None) -> ObjectStore:
    """The store at ``url`` (default: ``$DISTILL_STORE``, else ``./.distill_store``)."""
    url = url or os.environ.get("DISTILL_STORE") or DEFAULT_LOCAL_STORE
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 store URL needs a bucket: {url!r}")
        return S3Store(parsed.netloc, parsed.path, client=s3_client, endpoint_url=endpoint_url)
    if parsed.scheme == "file":
        # file://data/x names the host "data"; reading it as the path /x would write elsewhere.
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL must be file:///absolute/path, got {url!r}")
        return LocalStore(unquote(parsed.path))
    if parsed.scheme in ("", "local") or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStore(url.removeprefix("local://"))
    raise ValueError(f"unsupported store URL {url!r}: use a path, file://..., or s3://bucket/prefix")
