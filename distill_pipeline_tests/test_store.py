"""The object store contract, run against both stores: a local directory and S3 on a moto server."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.retries.standard import ExponentialBackoff

from distill_pipeline.core.store import (
    DEFAULT_LOCAL_STORE,
    S3_MAX_ATTEMPTS,
    S3_RETRY_CONFIG,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    S3Store,
    UnsafeKey,
    file_sha256,
    make_s3_client,
    open_store,
)
from distill_pipeline.defs.core.resources import StoreResource

INVALID_KEYS = ["", "../x", "/abs", "a//b", "a/../b", "./a", "a/.", "a/..", "a/", "..", "."]
BINARY = bytes(range(256)) * 4


def test_put_get_round_trip(any_store: ObjectStore) -> None:
    any_store.put_bytes("a/b/c.bin", BINARY)
    any_store.put_bytes("empty", b"")
    any_store.put_bytes("unicode/é ü.txt", "héllo".encode())
    assert any_store.get_bytes("a/b/c.bin") == BINARY
    assert any_store.get_bytes("empty") == b""
    assert any_store.get_bytes("unicode/é ü.txt") == "héllo".encode()


def test_overwrite_replaces_bytes(any_store: ObjectStore) -> None:
    any_store.put_bytes("k.txt", b"first, longer")
    any_store.put_bytes("k.txt", b"second")
    assert any_store.get_bytes("k.txt") == b"second"
    assert [info.key for info in any_store.list("")] == ["k.txt"]


def test_list_by_prefix(any_store: ObjectStore) -> None:
    contents = {
        "logs/dt=2024-01-01/a.jsonl": b"1",
        "logs/dt=2024-01-02/b.jsonl": b"22",
        "logs/dt=2024-02-01/c.jsonl": b"333",
        "logs/dt=2025-01-01/d.jsonl": b"4444",
        "logsbook.txt": b"55555",
        "tables/t.parquet": b"666666",
    }
    for key, data in contents.items():
        any_store.put_bytes(key, data)

    def keys(prefix: str) -> list[str]:
        return [info.key for info in any_store.list(prefix)]

    assert keys("") == sorted(contents)
    assert keys("logs/") == sorted(k for k in contents if k.startswith("logs/"))
    # A prefix may end mid-name, as S3 prefixes do.
    assert keys("logs/dt=2024-0") == [
        "logs/dt=2024-01-01/a.jsonl",
        "logs/dt=2024-01-02/b.jsonl",
        "logs/dt=2024-02-01/c.jsonl",
    ]
    assert keys("logs/dt=2024-01") == ["logs/dt=2024-01-01/a.jsonl", "logs/dt=2024-01-02/b.jsonl"]
    assert keys("logs") == sorted(k for k in contents if k.startswith("logs"))
    assert keys("logs/dt=2024-01-01/a.jsonl") == ["logs/dt=2024-01-01/a.jsonl"]
    assert keys("nothing/") == []
    assert keys("logs/dt=2026") == []
    assert {info.key: info.size for info in any_store.list("")} == {k: len(v) for k, v in contents.items()}


def test_list_version_changes_with_bytes(any_store: ObjectStore) -> None:
    any_store.put_bytes("v/obj", b"aaaa")
    (first,) = any_store.list("v/")
    assert first.version
    assert any_store.list("v/")[0].version == first.version  # stable while unchanged
    any_store.put_bytes("v/obj", b"bbbb")  # same size, different bytes
    (second,) = any_store.list("v/")
    assert (second.size, second.version != first.version) == (4, True)


def test_exists_and_delete(any_store: ObjectStore) -> None:
    assert not any_store.exists("d/x")
    any_store.put_bytes("d/x", b"x")
    any_store.put_bytes("d/y", b"y")
    assert any_store.exists("d/x")
    any_store.delete("d/x")
    assert not any_store.exists("d/x")
    assert [info.key for info in any_store.list("d/")] == ["d/y"]
    any_store.delete("d/x")  # deleting a missing key is a no-op
    any_store.delete("never/there")


def test_missing_key_raises_object_not_found(any_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        any_store.get_bytes("no/such/key")
    with pytest.raises(ObjectNotFound):
        any_store.get_file("no/such/key", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert issubclass(ObjectNotFound, KeyError)


def test_prefix_of_other_keys_is_not_an_object(any_store: ObjectStore, tmp_path: Path) -> None:
    """A "directory" exists only as the prefix of its objects, in both stores."""
    any_store.put_bytes("dir/inner/obj", b"x")
    for key in ("dir", "dir/inner"):
        assert not any_store.exists(key)
        with pytest.raises(ObjectNotFound):
            any_store.get_bytes(key)
        with pytest.raises(ObjectNotFound):
            any_store.get_file(key, tmp_path / "out")
        any_store.delete(key)
    assert any_store.get_bytes("dir/inner/obj") == b"x"
    with pytest.raises(ObjectNotFound):
        any_store.get_bytes("dir/inner/obj/below")


def test_put_file_get_file(any_store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    data = BINARY * 5000  # ~5 MB: s3transfer's multipart threshold is 8 MB, the local copy chunks at 4 MB
    source.write_bytes(data)
    any_store.put_file("files/blob.bin", source)
    assert any_store.get_bytes("files/blob.bin") == data
    target = tmp_path / "new" / "nested" / "blob.bin"
    any_store.get_file("files/blob.bin", target)
    assert target.read_bytes() == data
    any_store.put_bytes("files/small", b"small")
    any_store.get_file("files/small", target)  # overwrites an existing file
    assert target.read_bytes() == b"small"


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_rejected(any_store: ObjectStore, key: str, tmp_path: Path) -> None:
    any_store.put_bytes("ok", b"1")
    for call in (
        lambda: any_store.put_bytes(key, b"x"),
        lambda: any_store.get_bytes(key),
        lambda: any_store.exists(key),
        lambda: any_store.delete(key),
        lambda: any_store.put_file(key, tmp_path / "whatever"),
        lambda: any_store.get_file(key, tmp_path / "whatever"),
    ):
        with pytest.raises(ValueError, match="invalid store key"):
            call()
    assert [info.key for info in any_store.list("")] == ["ok"]


@pytest.mark.parametrize("prefix", ["../", "/", "/etc/", "a//", "a/../", "../../etc/passwd"])
def test_hostile_list_prefixes_rejected(any_store: ObjectStore, prefix: str) -> None:
    any_store.put_bytes("a/ok", b"1")
    with pytest.raises(ValueError, match="invalid store prefix"):
        any_store.list(prefix)


def test_local_store_stays_under_its_root(tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ValueError):
        store.get_bytes("../outside.txt")
    with pytest.raises(ValueError):
        store.list("../")
    assert store.list("") == []


def test_get_bytes_refuses_an_object_over_its_size_cap(any_store: ObjectStore) -> None:
    any_store.put_bytes("big", BINARY)
    assert any_store.get_bytes("big", max_bytes=len(BINARY)) == BINARY
    with pytest.raises(ObjectTooLarge, match=f"more than {len(BINARY) - 1} bytes"):
        any_store.get_bytes("big", max_bytes=len(BINARY) - 1)
    any_store.put_bytes("empty", b"")
    assert any_store.get_bytes("empty", max_bytes=0) == b""


# --- symlinks in the local store: followed only while they stay under the root -----------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the local store's root, holding a file the store must never show."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.jsonl").write_text("TOP SECRET\n")
    return folder


def test_local_store_refuses_a_symlinked_object_that_leads_outside(
    local_store: LocalStore, outside: Path, tmp_path: Path
) -> None:
    local_store.put_bytes("logs/ok.jsonl", b"fine")
    (local_store.root / "logs" / "leak.jsonl").symlink_to(outside / "secret.jsonl")
    for call in (
        lambda: local_store.get_bytes("logs/leak.jsonl"),
        lambda: local_store.get_file("logs/leak.jsonl", tmp_path / "copy"),
        lambda: local_store.exists("logs/leak.jsonl"),
    ):
        with pytest.raises(UnsafeKey, match="outside the store root"):
            call()
    assert not (tmp_path / "copy").exists()
    assert [info.key for info in local_store.list("")] == ["logs/ok.jsonl"]
    assert [info.key for info in local_store.list("logs/leak")] == []


def test_local_store_list_does_not_descend_into_symlinked_folders(local_store: LocalStore, outside: Path) -> None:
    local_store.put_bytes("logs/dt=2026-03-04/a.jsonl", b"a")
    (local_store.root / "logs" / "dt=2026-03-05").symlink_to(outside, target_is_directory=True)
    (local_store.root / "elsewhere").symlink_to(outside, target_is_directory=True)
    # Even a symlinked folder that stays inside is not walked: os.walk never follows one, and
    # following one could list a subtree twice or loop.
    (local_store.root / "logs" / "again").symlink_to(local_store.root / "logs", target_is_directory=True)
    assert [info.key for info in local_store.list("")] == ["logs/dt=2026-03-04/a.jsonl"]
    assert local_store.list("logs/dt=2026-03-05/") == []
    assert local_store.list("elsewhere/") == []
    with pytest.raises(UnsafeKey):
        local_store.get_bytes("elsewhere/secret.jsonl")


def test_local_store_list_skips_dangling_links_and_files_that_are_not_regular(local_store: LocalStore) -> None:
    local_store.put_bytes("logs/a.jsonl", b"a")
    (local_store.root / "logs" / "dangling.jsonl").symlink_to(local_store.root / "logs" / "gone.jsonl")
    (local_store.root / "logs" / "loop.jsonl").symlink_to(local_store.root / "logs" / "loop.jsonl")
    # A FIFO would block the reader that opens it for ever.
    os.mkfifo(local_store.root / "logs" / "fifo.jsonl")
    assert [info.key for info in local_store.list("logs/")] == ["logs/a.jsonl"]


def test_local_store_refuses_writes_into_a_symlinked_folder_that_leads_outside(
    local_store: LocalStore, outside: Path, tmp_path: Path
) -> None:
    (local_store.root / "tables").symlink_to(outside, target_is_directory=True)
    source = tmp_path / "source.bin"
    source.write_bytes(b"data")
    for call in (
        lambda: local_store.put_bytes("tables/raw_logs/dt=2026-03-04/records.parquet", b"data"),
        lambda: local_store.put_file("tables/raw_logs/dt=2026-03-04/records.parquet", source),
        lambda: local_store.put_bytes("tables/secret.jsonl", b"overwritten"),
        lambda: local_store.delete("tables/secret.jsonl"),
    ):
        with pytest.raises(UnsafeKey, match="outside the store root through a symlink"):
            call()
    assert sorted(path.name for path in outside.iterdir()) == ["secret.jsonl"]
    assert (outside / "secret.jsonl").read_text() == "TOP SECRET\n"


def test_local_store_follows_symlinks_that_stay_under_its_root(local_store: LocalStore) -> None:
    local_store.put_bytes("real/obj", b"inside")
    (local_store.root / "alias").symlink_to(local_store.root / "real", target_is_directory=True)
    (local_store.root / "real" / "link").symlink_to(local_store.root / "real" / "obj")
    assert local_store.get_bytes("alias/obj") == b"inside"
    assert local_store.get_bytes("real/link") == b"inside"
    local_store.put_bytes("alias/new", b"written through")
    assert local_store.get_bytes("real/new") == b"written through"
    assert [(info.key, info.size) for info in local_store.list("real/")] == [
        ("real/link", 6),
        ("real/new", 15),
        ("real/obj", 6),
    ]
    # Deleting a symlinked key removes the link, not the object it names.
    local_store.delete("real/link")
    assert local_store.get_bytes("real/obj") == b"inside"


def test_local_store_hides_its_temp_files(local_store: LocalStore) -> None:
    local_store.put_bytes("t/obj", b"x")
    (local_store.root / "t" / ".tmp-abandoned.obj").write_bytes(b"half written")
    assert [info.key for info in local_store.list("")] == ["t/obj"]


def test_s3_keys_are_relative_to_the_store_prefix(s3_store: S3Store) -> None:
    bucket, client = s3_store.bucket, s3_store.client
    sibling = S3Store(bucket, "some/prefix2", client=client)  # shares a string prefix
    other = S3Store(bucket, "elsewhere", client=client)
    root = S3Store(bucket, "", client=client)

    s3_store.put_bytes("logs/a.jsonl", b"mine")
    sibling.put_bytes("logs/a.jsonl", b"sibling")
    other.put_bytes("logs/b.jsonl", b"other")

    assert [info.key for info in s3_store.list("")] == ["logs/a.jsonl"]
    assert [info.key for info in sibling.list("logs/")] == ["logs/a.jsonl"]
    assert [info.key for info in other.list("")] == ["logs/b.jsonl"]
    assert s3_store.get_bytes("logs/a.jsonl") == b"mine"
    assert sibling.get_bytes("logs/a.jsonl") == b"sibling"
    assert not other.exists("logs/a.jsonl")
    assert not s3_store.exists("logs/b.jsonl")
    assert [info.key for info in root.list("")] == [
        "elsewhere/logs/b.jsonl",
        "some/prefix/logs/a.jsonl",
        "some/prefix2/logs/a.jsonl",
    ]
    s3_store.delete("logs/a.jsonl")
    assert sibling.get_bytes("logs/a.jsonl") == b"sibling"


def test_store_url_reopens_the_same_store(any_store: ObjectStore, moto_s3_server: str) -> None:
    any_store.put_bytes("x", b"1")
    again = open_store(any_store.url, endpoint_url=moto_s3_server)
    assert type(again) is type(any_store)
    assert again.url == any_store.url
    assert again.get_bytes("x") == b"1"


def test_local_url_round_trip_with_unusual_characters(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "my store é%20")
    store.put_bytes("k", b"v")
    again = open_store(store.url)
    assert isinstance(again, LocalStore)
    assert again.root == store.root
    assert again.get_bytes("k") == b"v"


class TestOpenStore:
    def test_plain_path(self, tmp_path: Path) -> None:
        store = open_store(str(tmp_path / "plain"))
        assert isinstance(store, LocalStore)
        assert store.root == (tmp_path / "plain").resolve()
        assert store.root.is_dir()

    def test_relative_path_resolves_against_cwd(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        store = open_store("rel/dir")
        assert isinstance(store, LocalStore)
        assert store.root == (tmp_path / "rel" / "dir").resolve()

    def test_file_url(self, tmp_path: Path) -> None:
        store = open_store((tmp_path / "viafile").as_uri())
        assert isinstance(store, LocalStore)
        assert store.root == (tmp_path / "viafile").resolve()
        assert isinstance(open_store(f"file://localhost{tmp_path / 'viahost'}"), LocalStore)

    def test_file_url_with_a_host_is_rejected(self) -> None:
        # file://data/x names host "data", not the relative path data/x; writing to /x is wrong.
        with pytest.raises(ValueError):
            open_store("file://data/x")

    def test_s3_url(self) -> None:
        client = object()  # never called: parsing must not touch the network
        store = open_store("s3://bucket/some/prefix/", s3_client=client)
        assert isinstance(store, S3Store)
        assert (store.bucket, store.prefix, store.client) == ("bucket", "some/prefix", client)
        assert store.url == "s3://bucket/some/prefix"
        bare = open_store("s3://bucket", s3_client=client)
        assert isinstance(bare, S3Store)
        assert (bare.bucket, bare.prefix, bare.url) == ("bucket", "", "s3://bucket")

    @pytest.mark.parametrize("url", ["s3:///prefix", "s3://", "gs://bucket/x", "http://host/x", "ftp://h/p"])
    def test_bad_urls_rejected(self, url: str) -> None:
        with pytest.raises(ValueError):
            open_store(url, s3_client=object())

    def test_default_comes_from_env_then_local_dir(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("DISTILL_STORE", str(tmp_path / "from-env"))
        store = open_store()
        assert isinstance(store, LocalStore)
        assert store.root == (tmp_path / "from-env").resolve()
        monkeypatch.delenv("DISTILL_STORE")
        store = open_store()
        assert isinstance(store, LocalStore)
        assert store.root == (tmp_path / DEFAULT_LOCAL_STORE).resolve()


class _Body:
    """The raw body botocore reads an AWSResponse's content from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: object):
        yield self.data


def _s3_error(status: int, code: str) -> AWSResponse:
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
    return AWSResponse("http://s3.test", status, {"Content-Type": "application/xml"}, _Body(body))


def _intercept_puts(store: S3Store, answer: Callable[[int], AWSResponse | None]) -> list[int]:
    """Answer each PutObject attempt (numbered from 1) with ``answer(n)``, or send it on when None."""
    attempts: list[int] = []

    def before_send(**_: object) -> AWSResponse | None:
        attempts.append(len(attempts) + 1)
        return answer(attempts[-1])

    store.client.meta.events.register("before-send.s3.PutObject", before_send)
    return attempts


@pytest.fixture
def no_backoff_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's backoff computed as zero, so a test of ten attempts takes no ten seconds."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


def test_s3_throttling_is_retried_by_botocore(s3_store: S3Store, no_backoff_waits: None) -> None:
    attempts = _intercept_puts(s3_store, lambda n: _s3_error(503, "SlowDown") if n <= 2 else None)
    s3_store.put_bytes("throttled", b"landed")
    assert attempts == [1, 2, 3]  # two 503 SlowDown, then the real put on the moto server
    assert s3_store.get_bytes("throttled") == b"landed"


def test_s3_retries_are_botocores_alone(s3_store: S3Store, no_backoff_waits: None) -> None:
    """A bucket that keeps throttling gets S3_MAX_ATTEMPTS calls in all, not attempts x retries."""
    attempts = _intercept_puts(s3_store, lambda n: _s3_error(503, "SlowDown"))
    with pytest.raises(ClientError, match="SlowDown"):
        s3_store.put_bytes("never", b"x")
    assert len(attempts) == S3_MAX_ATTEMPTS


def test_s3_access_denied_is_not_retried(s3_store: S3Store, no_backoff_waits: None) -> None:
    attempts = _intercept_puts(s3_store, lambda n: _s3_error(403, "AccessDenied"))
    with pytest.raises(ClientError, match="AccessDenied"):
        s3_store.put_bytes("forbidden", b"x")
    assert attempts == [1]


def test_every_s3_client_retries_alike(moto_s3_server: str) -> None:
    """The store resource's client (from dagster-aws's S3Resource) has make_s3_client's retry policy."""
    resource_store = StoreResource(url="s3://bucket/prefix", endpoint_url=moto_s3_server).open()
    assert isinstance(resource_store, S3Store)
    assert resource_store.client.meta.config.retries == S3_RETRY_CONFIG
    assert make_s3_client(moto_s3_server).meta.config.retries == S3_RETRY_CONFIG


def test_local_get_file_is_atomic(local_store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download that fails half-way leaves the old file whole and no temporary file behind."""
    target = tmp_path / "out" / "blob.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    local_store.put_bytes("blob", BINARY)

    def broken_copy(source, destination, length=0):
        destination.write(source.read(10))
        raise OSError("disk full")

    monkeypatch.setattr("distill_pipeline.core.store.shutil.copyfileobj", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        local_store.get_file("blob", target)
    assert target.read_bytes() == b"old"
    assert [path.name for path in target.parent.iterdir()] == ["blob.bin"]
    monkeypatch.undo()
    local_store.get_file("blob", target)
    assert file_sha256(target) == file_sha256(local_store.root / "blob")
