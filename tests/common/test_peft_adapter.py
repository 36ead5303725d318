"""PEFT interoperability: a prefix exported as a PEFT prefix-tuning adapter loads with
``PeftModel.from_pretrained`` and gives our logits; PEFT adapters (saved by PEFT itself)
import as prefixd prefixes with PEFT's logits; the round trip is exact; bad adapters are
refused naming what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import save as save_safetensors
from typer.testing import CliRunner

from common.architectures import prefix_shape
from common.data import Batch
from common.errors import IncompatiblePrefixError
from common.kv_cache import expand_prefix
from common.peft_adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    peft_adapter_files,
    peft_adapter_zip,
    read_peft_adapter,
    read_peft_adapter_dir,
    read_peft_adapter_zip,
    write_peft_adapter,
)
from common.prefix_file import Prefix, load_prefix, prompt_format, save_prefix
from common.training import prefix_logits

INPUT_IDS = torch.tensor([[10, 11, 12, 13], [14, 15, 16, 17]])


def random_prefix(loaded, length: int = 5, seed: int = 0) -> Prefix:
    shape = prefix_shape(loaded.model.config)
    generator = torch.Generator().manual_seed(seed)
    return Prefix(
        key_values=torch.randn(shape.tensor_shape(length), generator=generator),
        base_model_fingerprint=loaded.fingerprint,
        architecture=loaded.architecture,
        prompt_format=prompt_format(loaded.model.config),
        sections=shape.sections,
    )


def our_logits(loaded, prefix: Prefix) -> torch.Tensor:
    mask = torch.ones_like(INPUT_IDS)
    batch = Batch(INPUT_IDS, mask, INPUT_IDS)
    with torch.no_grad():
        return prefix_logits(loaded.model, expand_prefix(prefix.key_values, 2), batch)


def peft_logits(peft_model) -> torch.Tensor:
    with torch.no_grad():
        return peft_model(input_ids=INPUT_IDS, attention_mask=torch.ones_like(INPUT_IDS)).logits


def test_exported_adapter_loads_in_peft_and_the_round_trip_is_exact(tiny_model, tmp_path):
    prefix = random_prefix(tiny_model)
    ours = our_logits(tiny_model, prefix)
    directory = write_peft_adapter(
        peft_adapter_files(prefix, base_model_name=tiny_model.source), tmp_path / "adapter"
    )

    peft_model = PeftModel.from_pretrained(tiny_model.model, directory)
    torch.testing.assert_close(peft_logits(peft_model), ours, rtol=1e-5, atol=1e-5)
    base = peft_model.get_base_model()  # PEFT wraps the model, its weights are unchanged

    back = read_peft_adapter(read_peft_adapter_dir(directory), tiny_model)
    assert torch.equal(back.key_values, prefix.key_values)
    assert back.base_model_fingerprint == tiny_model.fingerprint
    assert back.metrics["imported_from"] == "peft"
    assert base is tiny_model.model


def test_an_adapter_saved_by_peft_imports_with_peft_s_logits(tiny_model, tmp_path):
    peft_model = get_peft_model(
        tiny_model.model,
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=False),
    )
    with torch.no_grad():
        weight = peft_model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
    theirs = peft_logits(peft_model)
    peft_model.save_pretrained(tmp_path / "saved")

    prefix = read_peft_adapter(read_peft_adapter_dir(tmp_path / "saved"), tiny_model)
    assert prefix.prefix_length == 4
    with peft_model.disable_adapter():
        torch.testing.assert_close(our_logits(tiny_model, prefix), theirs, rtol=1e-5, atol=1e-5)


def test_zip_transport_round_trips(tiny_llama):
    prefix = random_prefix(tiny_llama, seed=5)
    data = peft_adapter_zip(peft_adapter_files(prefix, base_model_name=tiny_llama.source))
    back = read_peft_adapter(read_peft_adapter_zip(data), tiny_llama)
    assert torch.equal(back.key_values, prefix.key_values)


def _files(loaded, **config_changes):
    files = peft_adapter_files(random_prefix(loaded), base_model_name=loaded.source)
    config = json.loads(files[ADAPTER_CONFIG])
    config.update(config_changes)
    files[ADAPTER_CONFIG] = json.dumps(config).encode()
    return files


def test_bad_adapters_are_refused_naming_the_problem(tiny_llama):
    width = json.loads(_files(tiny_llama)[ADAPTER_CONFIG])["token_dim"] * 2 * 2
    nan = torch.full((5, width), float("nan"))
    cases = [
        ({ADAPTER_WEIGHTS: b"x"}, "adapter_config.json is missing"),
        ({ADAPTER_CONFIG: b"{", ADAPTER_WEIGHTS: b"x"}, "is not JSON"),
        (_files(tiny_llama, peft_type="LORA"), "peft_type must be 'PREFIX_TUNING'"),
        (_files(tiny_llama, prefix_projection=True), "prefix_projection must be False"),
        (_files(tiny_llama, num_layers=7), "num_layers must be 2"),
        (_files(tiny_llama, num_virtual_tokens=6), "must have shape (6, "),
        (
            _files(tiny_llama) | {ADAPTER_WEIGHTS: save_safetensors({"other": nan})},
            "must hold exactly 'prompt_embeddings'",
        ),
        (
            _files(tiny_llama) | {ADAPTER_WEIGHTS: save_safetensors({"prompt_embeddings": nan})},
            "finite",
        ),
    ]
    for files, message in cases:
        with pytest.raises(IncompatiblePrefixError, match=message.replace("(", r"\(")):
            read_peft_adapter(files, tiny_llama)
    with pytest.raises(IncompatiblePrefixError, match="not a zip file"):
        read_peft_adapter_zip(b"not a zip")


def test_encoder_decoder_prefixes_do_not_map(tiny_seq2seq):
    prefix = random_prefix(tiny_seq2seq)
    with pytest.raises(IncompatiblePrefixError, match="encoder-decoder"):
        peft_adapter_files(prefix, base_model_name=tiny_seq2seq.source)
    with pytest.raises(IncompatiblePrefixError, match="encoder-decoder"):
        read_peft_adapter({}, tiny_seq2seq)


def test_cli_exports_and_imports(tiny_model_dirs, tiny_llama, tmp_path):
    from prefixd.cli import app

    prefix = random_prefix(tiny_llama, seed=9)
    save_prefix(prefix, tmp_path / "tenant.safetensors")
    model = str(tiny_model_dirs["llama"])
    runner = CliRunner()
    exported = runner.invoke(
        app,
        [
            "peft",
            "export",
            "--prefix",
            str(tmp_path / "tenant.safetensors"),
            "--out",
            str(tmp_path / "adapter"),
            "--model",
            model,
        ],
    )
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "adapter" / ADAPTER_CONFIG).is_file()
    imported = runner.invoke(
        app,
        [
            "peft",
            "import",
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "back.safetensors"),
            "--model",
            model,
        ],
    )
    assert imported.exit_code == 0, imported.output
    back = load_prefix(tmp_path / "back.safetensors", expected_fingerprint=tiny_llama.fingerprint)
    assert torch.equal(back.key_values, prefix.key_values)

    missing = runner.invoke(
        app,
        [
            "peft",
            "import",
            "--adapter",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--model",
            model,
        ],
    )
    assert missing.exit_code == 2
    assert "nowhere is not a directory" in missing.output and "Traceback" not in missing.output
