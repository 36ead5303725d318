"""``POST /v1/prefixes/peft``: a PEFT prefix-tuning adapter (zip or tar) becomes the caller's
next prefix version, checked like ``prefixd peft import``; a bad upload is a 400 naming the
problem and leaves no blob and no row."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
import zipfile

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from common.architectures import prefix_shape
from common.db import crud
from common.db.engine import session_scope
from common.db.errors import TenantNotActiveError
from common.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_TENSOR, peft_adapter_files
from common.prefix_file import Prefix, prefix_from_bytes
from services.api.prefix_import import store_imported_prefix
from tests.security.conftest import InProc, error


def adapter_files(inproc: InProc, length: int = 3, seed: int = 0) -> dict[str, bytes]:
    shape = prefix_shape(inproc.loaded.model.config).tensor_shape(length)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    prefix = Prefix(values, inproc.loaded.fingerprint, inproc.loaded.architecture)
    return peft_adapter_files(prefix, base_model_name="tiny")


def zipped(files: dict[str, bytes], folder: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(folder + name, data)
    return buffer.getvalue()


def tarred(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload(inproc: InProc, key: str | None, data: bytes, query: str = "") -> object:
    return inproc.request(
        "POST", f"/v1/prefixes/peft{query}", key, files={"file": ("adapter.zip", data)}
    )


def versions(inproc: InProc, key: str) -> list[dict]:
    return inproc.request("GET", "/v1/prefixes", key).json()["data"]


def test_an_exported_version_imports_as_a_new_version_with_the_same_values(inproc: InProc):
    tenant_id, key = inproc.new_tenant()
    original = inproc.publish(tenant_id, length=3, seed=5)
    exported = inproc.request("GET", f"/v1/prefixes/{original}/peft", key)
    assert exported.status_code == 200, exported.text

    response = upload(inproc, key, exported.content)
    assert response.status_code == 201, response.text
    imported = response.json()
    assert (imported["version"], imported["active"], imported["job_id"]) == (2, False, None)
    assert imported["prefix_length"] == 3 and imported["metrics"]["imported_from"] == "peft"
    assert [v["active"] for v in versions(inproc, key)] == [True, False]  # inactive by default

    def stored(prefix_id: str) -> torch.Tensor:
        (key_name,) = [k for k in inproc.objects(f"tenants/{tenant_id}/") if prefix_id in k]
        return prefix_from_bytes(inproc.blobs.get_bytes(key_name), source="test").key_values

    assert torch.equal(stored(imported["id"]), stored(str(original)))

    # A tar.gz of the directory, as the raw body, activated on request.
    raw = inproc.request(
        "POST",
        "/v1/prefixes/peft?activate=true",
        key,
        content=tarred(adapter_files(inproc, length=2, seed=6)),
        headers={"content-type": "application/gzip"},
    )
    assert raw.status_code == 201, raw.text
    assert raw.json()["version"] == 3 and raw.json()["active"]
    assert [v["active"] for v in versions(inproc, key)] == [False, False, True]
    # A zipped folder (what `zip -r adapter.zip adapter/` makes) imports too.
    folder = upload(inproc, key, zipped(adapter_files(inproc, seed=7), folder="adapter/"))
    assert folder.status_code == 201, folder.text
    assert upload(inproc, None, exported.content).status_code == 401


def _bad_archives(inproc: InProc) -> list[tuple[str, bytes, str]]:
    good = adapter_files(inproc)
    other_model = dict(good)
    config = json.loads(good[ADAPTER_CONFIG])
    other_model[ADAPTER_CONFIG] = json.dumps({**config, "num_layers": 30}).encode()
    flat = load_safetensors(good[ADAPTER_WEIGHTS])[PEFT_TENSOR]
    not_finite = dict(good)
    not_finite[ADAPTER_WEIGHTS] = save_safetensors(
        {PEFT_TENSOR: flat.index_fill(1, torch.tensor([3]), float("nan"))}
    )
    wrong_width = dict(good)
    wrong_width[ADAPTER_WEIGHTS] = save_safetensors({PEFT_TENSOR: flat[:, :-1].contiguous()})
    too_long = adapter_files(inproc, length=17)  # the limit: max_prefix_length 16
    projected = dict(good)
    projected[ADAPTER_CONFIG] = json.dumps({**config, "prefix_projection": True}).encode()
    bomb = zipped({**good, ADAPTER_WEIGHTS: bytes(2 * 1024 * 1024)})  # 2 MiB of zeros
    return [
        ("not an archive", b"just some bytes", "not a zip or tar archive"),
        ("a truncated zip", zipped(good)[:200], "PEFT adapter"),
        (
            "no weights",
            zipped({ADAPTER_CONFIG: good[ADAPTER_CONFIG]}),
            f"{ADAPTER_WEIGHTS} is missing",
        ),
        ("two configs", zipped({**good, "x/" + ADAPTER_CONFIG: b"{}"}), "more than once"),
        ("config not JSON", zipped({**good, ADAPTER_CONFIG: b"{"}), "is not JSON"),
        ("another model", zipped(other_model), "field num_layers must be 2 for this model, got 30"),
        ("projection", zipped(projected), "field prefix_projection must be False"),
        ("wrong width", zipped(wrong_width), "must have shape (3, 128)"),
        ("not finite", zipped(not_finite), "not finite"),
        ("too long", zipped(too_long), "17 virtual tokens; the limit is 16"),
        ("a zip bomb", bomb, "unpacks to 2097152 bytes, over the limit of 262144"),
        ("a link in a tar", _tar_with_link(good), "is not a regular file"),
    ]


def _tar_with_link(good: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(ADAPTER_CONFIG)
        info.size = len(good[ADAPTER_CONFIG])
        archive.addfile(info, io.BytesIO(good[ADAPTER_CONFIG]))
        link = tarfile.TarInfo(ADAPTER_WEIGHTS)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


def test_a_bad_adapter_is_a_400_naming_the_problem_and_leaves_nothing(inproc: InProc):
    tenant_id, key = inproc.new_tenant()
    for what, data, message in _bad_archives(inproc):
        status, code, text = error(upload(inproc, key, data))
        assert (status, code) == (400, "invalid_adapter"), (what, text)
        assert message in text, (what, text)
    assert versions(inproc, key) == []
    assert inproc.objects(f"tenants/{tenant_id}/") == []

    # Over the size limit: refused from Content-Length, before the body is read.
    big = upload(inproc, key, bytes(300 * 1024))
    assert error(big)[:2] == (413, "payload_too_large") and "max_peft_adapter_bytes" in big.text
    wrong_type = inproc.request(
        "POST",
        "/v1/prefixes/peft",
        key,
        content=b"{}",
        headers={"content-type": "application/json"},
    )
    assert error(wrong_type)[:2] == (415, "unsupported_media_type")
    assert versions(inproc, key) == [] and inproc.objects(f"tenants/{tenant_id}/") == []


def test_an_import_for_a_tenant_being_erased_writes_no_row_and_removes_its_blob(inproc: InProc):
    """The row is refused under the tenant's lock once it is deleting; the blob written
    before it is deleted again."""
    from common.peft_adapter import peft_prefix

    tenant_id, _ = inproc.new_tenant()
    prefix = peft_prefix(
        adapter_files(inproc),
        config=inproc.loaded.model.config,
        fingerprint=inproc.loaded.fingerprint,
    )
    with session_scope(inproc.db) as session:
        crud.begin_tenant_erasure(session=session, tenant_id=uuid.UUID(tenant_id))
    with pytest.raises(TenantNotActiveError):
        store_imported_prefix(
            engine=inproc.db,
            blobs=inproc.blobs,
            tenant_id=uuid.UUID(tenant_id),
            prefix=prefix,
            activate=True,
        )
    assert inproc.objects(f"tenants/{tenant_id}/") == []
    with session_scope(inproc.db) as session:
        assert crud.list_prefixes(session=session, tenant_id=uuid.UUID(tenant_id)) == []
