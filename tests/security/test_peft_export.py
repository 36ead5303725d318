"""``GET /v1/prefixes/{id}/peft``: the caller's prefix version as a zipped PEFT adapter that
PEFT loads with our logits; another tenant's version is a 404 like a missing one."""

from __future__ import annotations

import io
import uuid
import zipfile

import torch
from peft import PeftModel

from common.data import Batch
from common.kv_cache import expand_prefix
from common.prefix_file import prefix_from_bytes
from common.training import prefix_logits
from tests.security.conftest import InProc, error


def test_a_prefix_version_downloads_as_a_peft_adapter(inproc: InProc, tmp_path) -> None:
    tenant_id, key = inproc.new_tenant()
    _, other_key = inproc.new_tenant()
    prefix_id = inproc.publish(tenant_id, length=3, seed=4)

    response = inproc.request("GET", f"/v1/prefixes/{prefix_id}/peft", key)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert sorted(archive.namelist()) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        archive.extractall(tmp_path / "adapter")

    (row,) = [b for b in inproc.objects() if str(prefix_id) in b]
    stored = prefix_from_bytes(inproc.blobs.get_bytes(row), source="test")
    input_ids = torch.tensor([[10, 11, 12]])
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        ours = prefix_logits(
            inproc.loaded.model,
            expand_prefix(stored.key_values, 1),
            Batch(input_ids, mask, input_ids),
        )
        peft_model = PeftModel.from_pretrained(inproc.loaded.model, tmp_path / "adapter")
        theirs = peft_model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    foreign = inproc.request("GET", f"/v1/prefixes/{prefix_id}/peft", other_key)
    missing = inproc.request("GET", f"/v1/prefixes/{uuid.uuid4()}/peft", other_key)
    assert error(foreign)[:2] == error(missing)[:2] == (404, "not_found")
    assert inproc.request("GET", f"/v1/prefixes/{prefix_id}/peft", None).status_code == 401
