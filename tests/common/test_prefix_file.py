import json
import struct

import pytest
import torch
from safetensors.torch import save as save_safetensors

from common.architectures import prefix_shape
from common.data import Example, collate, encode_examples
from common.errors import IncompatiblePrefixError
from common.kv_cache import expand_prefix
from common.model_loading import fingerprint_model
from common.prefix_file import Prefix, load_prefix, prefix_from_bytes, prefix_to_bytes, save_prefix
from common.training import prefix_logits, train_prefix
from common.training_config import TrainingConfig


def trained_prefix(loaded, dtype="float32") -> Prefix:
    config = TrainingConfig(prefix_length=3, mid_dim=16, epochs=1, dtype=dtype)
    return train_prefix(loaded, [Example("alpha", "red green")], config).prefix


def test_save_load_generates_identical_logits(tiny_model, tmp_path):
    prefix = trained_prefix(tiny_model)
    path = save_prefix(prefix, tmp_path / "p.safetensors")
    loaded = load_prefix(
        path,
        expected_fingerprint=tiny_model.fingerprint,
        expected_shape=prefix_shape(tiny_model.model.config),
    )
    assert loaded.hyperparameters == json.loads(json.dumps(prefix.hyperparameters))
    assert loaded.architecture == tiny_model.architecture
    batch = collate(
        encode_examples(tiny_model.tokenizer, [Example("beta gamma", "one")], max_tokens=64),
        pad_id=0,
    )
    logits = [
        prefix_logits(tiny_model.model, expand_prefix(p.key_values, 1), batch)
        for p in (prefix, loaded)
    ]
    assert torch.equal(logits[0], logits[1])


def test_file_has_only_the_prefix_tensor_and_the_metadata(tiny_llama, tmp_path):
    from safetensors import safe_open

    path = save_prefix(trained_prefix(tiny_llama), tmp_path / "p.safetensors")
    with safe_open(path, "pt") as handle:
        assert list(handle.keys()) == ["self_attn.key_values"]  # no P', no MLP weights
        metadata = handle.metadata()
    assert metadata["base_model_fingerprint"] == tiny_llama.fingerprint
    assert metadata["architecture"] == "llama"
    assert metadata["prefix_length"] == "3" and metadata["dtype"] == "float32"
    for key in ("format_version", "hyperparameters", "metrics", "created_at"):
        assert metadata[key]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_half_precision_round_trip(tiny_llama, dtype):
    prefix = trained_prefix(tiny_llama, dtype)
    loaded = prefix_from_bytes(prefix_to_bytes(prefix))
    assert loaded.key_values.dtype == getattr(torch, dtype)
    assert torch.equal(loaded.key_values, prefix.key_values)


def test_fingerprint_mismatch_is_refused(tiny_model_dirs, tiny_llama, test_settings):
    from common.model_loading import load_model

    prefix = trained_prefix(tiny_llama)
    other = load_model(str(tiny_model_dirs["llama"]), settings=test_settings)
    with torch.no_grad():
        other.model.model.embed_tokens.weight[5, 0] += 1e-3  # one weight differs
    other_fingerprint = fingerprint_model(other.model)
    assert other_fingerprint != tiny_llama.fingerprint
    with pytest.raises(IncompatiblePrefixError, match="trained for another base model"):
        prefix_from_bytes(prefix_to_bytes(prefix), expected_fingerprint=other_fingerprint)


def test_prefix_for_another_architecture_does_not_fit(tiny_model_dirs, tiny_llama, test_settings):
    from common.model_loading import load_model

    gpt2 = load_model(str(tiny_model_dirs["gpt2"]), settings=test_settings)
    data = prefix_to_bytes(trained_prefix(tiny_llama))
    with pytest.raises(IncompatiblePrefixError, match="does not fit the model"):
        prefix_from_bytes(data, expected_shape=prefix_shape(gpt2.model.config))


def _rewrite(data: bytes, tensors: dict[str, torch.Tensor], **metadata_changes) -> bytes:
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + size])["__metadata__"] | metadata_changes
    return save_safetensors(tensors, metadata)


def test_malformed_files_are_refused(tiny_llama, tmp_path):
    good = prefix_to_bytes(trained_prefix(tiny_llama))
    key_values = prefix_from_bytes(good).key_values
    cases = {
        "truncated": (good[: len(good) // 2], "corrupt prefix file|truncated"),
        "tiny": (good[:4], "truncated header"),
        "not json": (struct.pack("<Q", 5) + b"{{{{{", "not a prefix file"),
        "extra tensor": (
            _rewrite(good, {"self_attn.key_values": key_values, "mlp.0.weight": torch.zeros(2, 2)}),
            "expected exactly one tensor",
        ),
        "wrong shape": (
            _rewrite(good, {"self_attn.key_values": key_values[:, :, :, :2].contiguous()}),
            "does not match the metadata",
        ),
        "wrong dtype": (
            _rewrite(good, {"self_attn.key_values": key_values.to(torch.float64)}, dtype="float64"),
            "dtype must be one of",
        ),
        "future format": (
            _rewrite(good, {"self_attn.key_values": key_values}, format_version="9"),
            "format version",
        ),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(IncompatiblePrefixError, match=message):
            prefix_from_bytes(data, source=name)
    with pytest.raises(IncompatiblePrefixError, match="cannot read prefix file"):
        load_prefix(tmp_path / "missing.safetensors")


def test_save_is_atomic(tiny_llama, tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    prefix = trained_prefix(tiny_llama)
    save_prefix(prefix, path)
    original = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("common.prefix_file.os.replace", fail)
    with pytest.raises(OSError):
        save_prefix(trained_prefix(tiny_llama), path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left
