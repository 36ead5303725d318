"""The blob stores: S3 over HTTP (moto's standalone server, through boto3 exactly as in
production) and the local directory."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError

from common.blobstore import (
    BlobIntegrityError,
    BlobNotFoundError,
    BlobStore,
    BlobStoreError,
    BucketNotFoundError,
    LocalBlobStore,
    build_blob_store,
    dataset_key,
    prefix_key,
    tenant_key_prefix,
)
from common.blobstore.base import sha256_hex
from common.blobstore.keys import datasets_key_prefix, validate_id
from common.blobstore.s3 import S3BlobStore
from common.config import Settings
from common.errors import InvalidInputError

MB = 1024 * 1024


def _ids() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


def _tamper(
    store: BlobStore, key: str, data: bytes, s3_client: Any, *, keep_checksum: bool
) -> None:
    """Change an object's bytes behind the store's back."""
    if isinstance(store, S3BlobStore):
        metadata = {"sha256": sha256_hex(b"original")} if keep_checksum else {}
        s3_client.put_object(
            Bucket=store.bucket, Key=store.base + key, Body=data, Metadata=metadata
        )
    else:
        assert isinstance(store, LocalBlobStore)
        path = store.root / key
        path.write_bytes(data)
        if not keep_checksum:
            store._sidecar(path).unlink()


# --- both stores ----------------------------------------------------------------------------


def test_put_get_head_delete(blob_store: BlobStore) -> None:
    tenant, dataset = _ids()
    key = dataset_key(tenant, dataset)
    data = b'{"input": "a", "output": "b"}\n' * 100
    info = blob_store.put_bytes(key, data)
    assert (info.key, info.size, info.sha256) == (key, len(data), sha256_hex(data))
    assert blob_store.get_bytes(key) == data
    head = blob_store.head(key)
    assert head is not None and head.size == len(data) and head.sha256 == sha256_hex(data)
    assert blob_store.exists(key)

    blob_store.put_bytes(key, b"replaced")  # overwrite
    assert blob_store.get_bytes(key) == b"replaced"

    blob_store.delete(key)
    assert not blob_store.exists(key) and blob_store.head(key) is None
    with pytest.raises(BlobNotFoundError, match=dataset):
        blob_store.get_bytes(key)
    blob_store.delete(key)  # deleting a missing object is fine


def test_files_round_trip(blob_store: BlobStore, tmp_path: Path) -> None:
    tenant, prefix_id = _ids()
    key = prefix_key(tenant, prefix_id)
    src = tmp_path / "prefix.safetensors"
    src.write_bytes(bytes(range(256)) * 1000)
    info = blob_store.put_file(key, src)
    assert info.sha256 == sha256_hex(src.read_bytes())
    dest = tmp_path / "out" / "copy.safetensors"
    got = blob_store.download_file(key, dest)
    assert dest.read_bytes() == src.read_bytes() and got.sha256 == info.sha256
    assert [p.name for p in dest.parent.iterdir()] == ["copy.safetensors"]  # no temp left
    with pytest.raises(BlobNotFoundError):
        blob_store.download_file(prefix_key(tenant, uuid.uuid4()), tmp_path / "missing")


def test_list_and_delete_by_tenant_prefix(blob_store: BlobStore) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    a_keys = [dataset_key(alice, uuid.uuid4()), prefix_key(alice, uuid.uuid4())]
    b_key = dataset_key(bob, uuid.uuid4())
    for i, key in enumerate([*a_keys, b_key]):
        blob_store.put_bytes(key, b"x" * (i + 1))
    listed = blob_store.list_objects(tenant_key_prefix(alice))
    assert [b.key for b in listed] == sorted(a_keys)
    assert [b.key for b in blob_store.list_objects(datasets_key_prefix(alice))] == [a_keys[0]]
    assert {v.key for v in blob_store.list_versions(tenant_key_prefix(alice))} == set(a_keys)

    assert blob_store.delete_prefix(tenant_key_prefix(alice)) == 2
    assert blob_store.list_objects(tenant_key_prefix(alice)) == []
    assert blob_store.list_versions(tenant_key_prefix(alice)) == []
    assert blob_store.get_bytes(b_key) == b"xxx"  # the other tenant is untouched
    assert blob_store.delete_prefix(tenant_key_prefix(alice)) == 0


@pytest.mark.parametrize("keep_checksum", [True, False], ids=["corrupt", "no-checksum"])
def test_tampered_object_is_detected(
    blob_store: BlobStore, keep_checksum: bool, tmp_path: Path, s3_client: Any
) -> None:
    tenant, prefix_id = _ids()
    key = prefix_key(tenant, prefix_id)
    blob_store.put_bytes(key, b"original")
    _tamper(blob_store, key, b"0riginal", s3_client, keep_checksum=keep_checksum)
    with pytest.raises(BlobIntegrityError, match=prefix_id):
        blob_store.get_bytes(key)
    dest = tmp_path / "downloads" / "dest.bin"
    dest.parent.mkdir()
    with pytest.raises(BlobIntegrityError):
        blob_store.download_file(key, dest)
    assert list(dest.parent.iterdir()) == []  # nothing half-written is left


@pytest.mark.parametrize(
    "key", ["", "../etc/passwd", "/abs/key", "a//b", "a/../b", ".hidden", "a/.tmp", "sp ace"]
)
def test_invalid_keys_are_refused(blob_store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidInputError):
        blob_store.put_bytes(key, b"x")
    with pytest.raises(InvalidInputError):
        blob_store.get_bytes(key)


def test_delete_prefix_refuses_everything_and_partial_names(blob_store: BlobStore) -> None:
    with pytest.raises(InvalidInputError):
        blob_store.delete_prefix("")
    with pytest.raises(BlobStoreError):
        blob_store.delete_prefix("tenants")  # would also match tenants-other/…


# --- key layout -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "alice",
        "../other",
        "tenants/x",
        "748A3C6F-103C-471D-9A75-760FA12C4EA8",
        "2c9228f8-f539-43bd-b2da-7cf19baa7c7c/..",
        None,
    ],
)
def test_invalid_tenant_id_is_rejected(bad: Any) -> None:
    with pytest.raises(InvalidInputError, match="invalid tenant id"):
        tenant_key_prefix(bad)
    with pytest.raises(InvalidInputError):
        dataset_key(bad, uuid.uuid4())


def test_key_layout_uses_ids_only() -> None:
    tenant, dataset = uuid.uuid4(), uuid.uuid4()
    assert tenant_key_prefix(tenant) == f"tenants/{tenant}/"
    assert dataset_key(tenant, dataset) == f"tenants/{tenant}/datasets/{dataset}.jsonl"
    assert prefix_key(str(tenant), dataset) == f"tenants/{tenant}/prefixes/{dataset}.safetensors"
    assert validate_id(tenant) == str(tenant)
    with pytest.raises(InvalidInputError, match="invalid dataset id"):
        dataset_key(tenant, "my-data.jsonl")


# --- local directory ------------------------------------------------------------------------


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    key = dataset_key(*_ids())
    store.put_bytes(key, b"version 1")

    def failing() -> Iterator[bytes]:
        yield b"half of version 2"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store._put(key, failing())
    assert store.get_bytes(key) == b"version 1"
    leftovers = [p.name for p in (store.root / key).parent.iterdir()]
    assert sorted(leftovers) == sorted([Path(key).name, f".{Path(key).name}.sha256"])
    store.check()


# --- S3 -------------------------------------------------------------------------------------


def test_s3_delete_prefix_erases_every_version(
    make_bucket: Callable[..., str], s3_endpoint_url: str, boto_session: Any, s3_client: Any
) -> None:
    bucket = make_bucket(versioned=True)
    store = S3BlobStore(bucket, "data", endpoint_url=s3_endpoint_url, session=boto_session)
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    k1, k2 = dataset_key(alice, uuid.uuid4()), prefix_key(alice, uuid.uuid4())
    store.put_bytes(k1, b"v1")
    store.put_bytes(k1, b"v2")
    store.put_bytes(k2, b"prefix")
    s3_client.delete_object(Bucket=bucket, Key=f"data/{k2}")  # leaves a delete marker
    store.put_bytes(dataset_key(bob, uuid.uuid4()), b"bob")

    versions = store.list_versions(tenant_key_prefix(alice))
    assert len(versions) == 4 and sum(v.is_delete_marker for v in versions) == 1
    assert store.delete_prefix(tenant_key_prefix(alice)) == 2

    raw = s3_client.list_object_versions(Bucket=bucket, Prefix=f"data/{tenant_key_prefix(alice)}")
    assert raw.get("Versions", []) == [] and raw.get("DeleteMarkers", []) == []
    assert store.list_versions(tenant_key_prefix(alice)) == []
    assert len(store.list_objects(tenant_key_prefix(bob))) == 1

    # A single delete on a versioned bucket also leaves no version behind.
    store.put_bytes(k1, b"again")
    store.put_bytes(k1, b"and again")
    store.delete(k1)
    raw = s3_client.list_object_versions(Bucket=bucket, Prefix=f"data/{k1}")
    assert raw.get("Versions", []) == [] and raw.get("DeleteMarkers", []) == []


def test_s3_large_objects_go_up_in_parts(
    make_bucket: Callable[..., str],
    s3_endpoint_url: str,
    boto_session: Any,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    store = S3BlobStore(
        make_bucket(),
        endpoint_url=s3_endpoint_url,
        session=boto_session,
        multipart_threshold=5 * MB,
        multipart_chunksize=5 * MB,
    )
    src = tmp_path / "big.bin"
    src.write_bytes(uuid.uuid4().bytes * (6 * MB // 16 + 1))
    key = prefix_key(*_ids())
    info = store.put_file(key, src)
    etag = s3_client.head_object(Bucket=store.bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-2")  # two parts
    assert store.get_bytes(key) == src.read_bytes()
    assert store.download_file(key, tmp_path / "back.bin").sha256 == info.sha256
    data = src.read_bytes()[: 5 * MB + 7]
    store.put_bytes(key, data)  # bytes above the threshold too
    assert store.get_bytes(key) == data


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def _inject(store: S3BlobStore, operation: str, failures: int, kind: str) -> list[str]:
    """Fail the next ``failures`` HTTP sends of ``operation`` before they leave the client
    (a 503 answer or a dropped connection); botocore's retry machinery sees them as real."""
    calls: list[str] = []

    def before_send(request: Any, **_: Any) -> AWSResponse | None:
        calls.append(request.method)
        if len(calls) > failures:
            return None
        if kind == "connection":
            raise ConnectionClosedError(endpoint_url=request.url)
        body = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
        return AWSResponse(request.url, 503, {}, _Raw(body))

    store.client.meta.events.register(f"before-send.s3.{operation}", before_send)
    return calls


@pytest.mark.parametrize("kind", ["503", "connection"])
def test_s3_transient_errors_are_retried(s3_store: S3BlobStore, kind: str) -> None:
    key = dataset_key(*_ids())
    put_calls = _inject(s3_store, "PutObject", 1, kind)
    get_calls = _inject(s3_store, "GetObject", 1, kind)
    s3_store.put_bytes(key, b"survives")
    assert s3_store.get_bytes(key) == b"survives"
    assert len(put_calls) == 2 and len(get_calls) == 2


def test_s3_gives_up_after_max_attempts(
    make_bucket: Callable[..., str], s3_endpoint_url: str, boto_session: Any
) -> None:
    store = S3BlobStore(
        make_bucket(), endpoint_url=s3_endpoint_url, session=boto_session, max_attempts=2
    )
    calls = _inject(store, "GetObject", 99, "503")
    with pytest.raises(BlobStoreError, match="ServiceUnavailable") as info:
        store.get_bytes(dataset_key(*_ids()))
    assert store.bucket in str(info.value) and len(calls) == 2


def test_missing_bucket_is_reported_by_name(s3_endpoint_url: str, boto_session: Any) -> None:
    store = S3BlobStore(
        "prefixd-no-such-bucket", endpoint_url=s3_endpoint_url, session=boto_session
    )
    key = dataset_key(*_ids())
    calls: list[Callable[[], Any]] = [
        store.check,
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.head(key),
        lambda: store.list_objects(""),
        lambda: store.delete_prefix(tenant_key_prefix(uuid.uuid4())),
    ]
    for call in calls:
        with pytest.raises(BucketNotFoundError, match="'prefixd-no-such-bucket' does not exist"):
            call()


def test_s3_keys_live_under_the_url_prefix(
    make_bucket: Callable[..., str], s3_endpoint_url: str, boto_session: Any, s3_client: Any
) -> None:
    bucket = make_bucket()
    settings = Settings(blob_url=f"s3://{bucket}/team/a", s3_endpoint_url=s3_endpoint_url)
    store = build_blob_store(settings, boto_session=boto_session)
    assert isinstance(store, S3BlobStore) and store.url == f"s3://{bucket}/team/a/"
    store.check()
    key = dataset_key(*_ids())
    store.put_bytes(key, b"data")
    raw = s3_client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in raw] == [f"team/a/{key}"]
    assert [b.key for b in store.list_objects()] == [key]


def test_build_blob_store_from_settings(tmp_path: Path) -> None:
    default = build_blob_store(Settings(home=tmp_path))
    assert isinstance(default, LocalBlobStore) and default.root == tmp_path / "blobs"
    explicit = build_blob_store(Settings(blob_url=f"file://{tmp_path}/x"))
    assert isinstance(explicit, LocalBlobStore) and explicit.root == tmp_path / "x"
    with pytest.raises(InvalidInputError, match="gs"):
        build_blob_store(Settings(blob_url="gs://bucket/x"))
    with pytest.raises(InvalidInputError, match="bucket name"):
        build_blob_store(Settings(blob_url="s3://B/x"))


def test_unfinished_writes_are_listed_and_aborted(blob_store) -> None:
    """S3: a multipart upload never completed; local: a writer's temporary file. Neither
    shows as an object; both are listed and aborted, and nothing else is touched."""
    blob_store.put_bytes("t/a/kept.bin", b"kept")  # its checksum sidecar is no leftover
    if isinstance(blob_store, LocalBlobStore):
        (blob_store.root / "t" / "a" / ".tmp-killed").write_bytes(b"half")
        expected = "temporary file t/a/.tmp-killed"
    else:
        upload = blob_store.client.create_multipart_upload(
            Bucket=blob_store.bucket, Key=blob_store._full("t/a/big.bin")
        )
        expected = f"unfinished multipart upload of t/a/big.bin (upload {upload['UploadId']}"
    assert [b.key for b in blob_store.list_objects("t/")] == ["t/a/kept.bin"]
    (found,) = blob_store.list_incomplete_uploads("t/")
    assert found.describe().startswith(expected)
    assert blob_store.list_incomplete_uploads("u/") == []
    assert blob_store.abort_incomplete_uploads("t/") == 1
    assert blob_store.list_incomplete_uploads("t/") == []
    assert blob_store.get_bytes("t/a/kept.bin") == b"kept"
