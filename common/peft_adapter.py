"""Hugging Face PEFT prefix-tuning adapters in and out of prefixd.

A prefixd prefix of a decoder-only model is exactly what PEFT's
``PrefixTuningConfig(task_type="CAUSAL_LM", prefix_projection=False)`` stores, in another
layout: PEFT keeps one tensor ``prompt_embeddings`` ``(P, layers·2·kv_heads·head_dim)``,
read as ``(P, layers, 2, kv_heads, head_dim)``; ours is ``(layers, 2, kv_heads, P,
head_dim)``. Both put the prefix in front of the input as past key/values with the same
positions, so the same values give the same logits (tests/common/test_peft_adapter.py).

    files = peft_adapter_files(prefix, base_model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    write_peft_adapter(files, "adapter/")             # PeftModel.from_pretrained(model, "adapter/")
    prefix = read_peft_adapter(files, loaded)         # a prefixd Prefix for this base model
    files = read_peft_adapter_archive(data)           # the adapter files of a zip or tar upload

What maps: decoder-only models (every family in ``common/architectures.py``), PEFT adapters
saved with ``prefix_projection=False`` (or any adapter after PEFT materialized it). What does
not: encoder-decoder prefixes (PEFT's ``SEQ_2_SEQ_LM`` prefix tuning has only the decoder's
self-attention prefix; ours also has the encoder's and the cross-attention's) and
``prefix_projection=True`` adapters, whose file holds ``P'`` and the MLP instead of ``P``.
PEFT records no model fingerprint, only ``base_model_name_or_path``: an imported adapter is
checked against the loaded model's shapes and gets that model's fingerprint. PEFT keeps no
prompt format either: prefixd's (``input <sep> output``, see ``common/data.py``) is named in the
exported README.
"""

from __future__ import annotations

import io
import json
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import PretrainedConfig

from common.architectures import is_encoder_decoder, prefix_shape
from common.errors import IncompatiblePrefixError
from common.model_loading import LoadedModel
from common.prefix_file import Prefix, prefix_from_bytes, prefix_to_bytes, prompt_format

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
README = "README.md"
PEFT_TENSOR = "prompt_embeddings"
MAX_ZIP_MEMBER_BYTES = 1 << 30  # a prefix is megabytes; refuse a zip bomb before inflating
MAX_ARCHIVE_MEMBERS = 64  # an adapter directory holds a handful of files


def peft_adapter_files(prefix: Prefix, *, base_model_name: str) -> dict[str, bytes]:
    """The files of a PEFT adapter directory holding ``prefix`` (already validated against
    its base model, as every stored prefix is); ``base_model_name`` goes into PEFT's
    ``base_model_name_or_path``."""
    if prefix.sections:
        raise IncompatiblePrefixError(
            "cannot export a prefix of an encoder-decoder model: PEFT prefix tuning of "
            "encoder-decoder models has only the decoder's self-attention prefix, prefixd's "
            "also the encoder's and the cross-attention's; only decoder-only models map"
        )
    layers, _, kv_heads, length, head_dim = prefix.key_values.shape
    # (layers, 2, kv_heads, P, hs) → (P, layers, 2, kv_heads, hs) → (P, layers·2·kv_heads·hs)
    flat = prefix.key_values.permute(3, 0, 1, 2, 4).reshape(length, -1).contiguous()
    config: dict[str, Any] = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(length),
        "num_layers": int(layers),
        # PEFT's grouped-query attention convention: heads and token_dim of the key/values.
        "num_attention_heads": int(kv_heads),
        "token_dim": int(kv_heads * head_dim),
        "encoder_hidden_size": int(kv_heads * head_dim),
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "auto_mapping": None,
        "modules_to_save": None,
    }
    readme = (
        "# prefixd prefix as a PEFT prefix-tuning adapter\n\n"
        f"Base model fingerprint (prefixd): `{prefix.base_model_fingerprint}`\n\n"
        f"Prompt format: `{prefix.prompt_format}`: the model reads `input`, then the "
        "tokenizer's BOS token (EOS if it has none), then generates the output.\n"
    )
    return {
        ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
        ADAPTER_WEIGHTS: save_safetensors({PEFT_TENSOR: flat}, {"format": "pt"}),
        README: readme.encode(),
    }


def read_peft_adapter(files: Mapping[str, bytes], loaded: LoadedModel) -> Prefix:
    """A PEFT prefix-tuning adapter's files → a validated prefixd :class:`Prefix`."""
    return peft_prefix(files, config=loaded.model.config, fingerprint=loaded.fingerprint)


def peft_prefix(
    files: Mapping[str, bytes], *, config: PretrainedConfig, fingerprint: str
) -> Prefix:
    """:func:`read_peft_adapter` from the base model's config and fingerprint alone (the API
    has no weights): the same checks, the same prefix."""
    if is_encoder_decoder(config):
        raise IncompatiblePrefixError(
            "cannot import a PEFT adapter for an encoder-decoder model: only decoder-only "
            "models map (PEFT's encoder-decoder prefix covers the decoder's self-attention only)"
        )
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if name not in files:
            raise IncompatiblePrefixError(f"PEFT adapter: {name} is missing")
    try:
        adapter = json.loads(files[ADAPTER_CONFIG])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IncompatiblePrefixError(
            f"PEFT adapter: {ADAPTER_CONFIG} is not JSON: {error}"
        ) from None
    if not isinstance(adapter, dict):
        raise IncompatiblePrefixError(f"PEFT adapter: {ADAPTER_CONFIG} must be a JSON object")
    shape = prefix_shape(config)
    expected = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "prefix_projection": False,
        "num_layers": shape.layers,
        "num_transformer_submodules": 1,
    }
    for field, want in expected.items():
        got = adapter.get(field, want if field == "num_transformer_submodules" else None)
        if got != want:
            raise IncompatiblePrefixError(
                f"PEFT adapter: {ADAPTER_CONFIG} field {field} must be {want!r} for this "
                f"model, got {got!r}"
            )
    try:
        tensors = load_safetensors(files[ADAPTER_WEIGHTS])
    except (SafetensorError, ValueError) as error:
        raise IncompatiblePrefixError(
            f"PEFT adapter: {ADAPTER_WEIGHTS} is unreadable: {error}"
        ) from None
    if set(tensors) != {PEFT_TENSOR}:
        raise IncompatiblePrefixError(
            f"PEFT adapter: {ADAPTER_WEIGHTS} must hold exactly {PEFT_TENSOR!r}, "
            f"got {sorted(tensors)}"
        )
    flat = tensors[PEFT_TENSOR]
    length = adapter.get("num_virtual_tokens")
    width = shape.layers * 2 * shape.kv_heads * shape.head_dim
    if not isinstance(length, int) or tuple(flat.shape) != (length, width):
        raise IncompatiblePrefixError(
            f"PEFT adapter: {PEFT_TENSOR} must have shape ({length}, {width}) "
            f"(num_virtual_tokens, layers·2·kv_heads·head_dim), got {tuple(flat.shape)}"
        )
    # (P, layers·2·kv_heads·hs) → (P, layers, 2, kv_heads, hs) → (layers, 2, kv_heads, P, hs)
    key_values = flat.reshape(length, shape.layers, 2, shape.kv_heads, shape.head_dim)
    key_values = key_values.permute(1, 2, 3, 0, 4).contiguous()
    if key_values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        key_values = key_values.float()
    prefix = Prefix(
        key_values=key_values,
        base_model_fingerprint=fingerprint,
        architecture=str(config.model_type),
        prompt_format=prompt_format(config),
        metrics={
            "imported_from": "peft",
            "peft_base_model": adapter.get("base_model_name_or_path"),
        },
    )
    # One validation path for every prefix that enters prefixd: the file format's checks
    # (finite values, zero length, dtype, shape against the model).
    return prefix_from_bytes(
        prefix_to_bytes(prefix),
        source="PEFT adapter",
        expected_fingerprint=fingerprint,
        expected_shape=shape,
    )


def write_peft_adapter(files: Mapping[str, bytes], directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def read_peft_adapter_dir(directory: str | Path) -> dict[str, bytes]:
    directory = Path(directory)
    if not directory.is_dir():
        raise IncompatiblePrefixError(f"PEFT adapter: {directory} is not a directory")
    return {
        name: (directory / name).read_bytes()
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
        if (directory / name).is_file()
    }


def peft_adapter_zip(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _wanted(path: str, size: int, files: Mapping[str, bytes], max_member_bytes: int) -> bool:
    """Whether an archive member is one of the adapter's files (at the root or in one
    folder), refusing a second copy of one and one over the size limit before reading it."""
    name = path.rsplit("/", 1)[-1]
    if name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        return False
    if name in files:
        raise IncompatiblePrefixError(f"PEFT adapter: the archive holds {name} more than once")
    if size > max_member_bytes:
        raise IncompatiblePrefixError(
            f"PEFT adapter: {path} unpacks to {size} bytes, over the limit of {max_member_bytes}"
        )
    return True


def read_peft_adapter_zip(
    data: bytes, *, max_member_bytes: int = MAX_ZIP_MEMBER_BYTES
) -> dict[str, bytes]:
    """The adapter files of a zip (at its root or in one folder), sizes checked first."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as error:
        raise IncompatiblePrefixError(f"PEFT adapter: not a zip file: {error}") from error
    files: dict[str, bytes] = {}
    with archive:
        members = archive.infolist()
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise IncompatiblePrefixError(
                f"PEFT adapter: the archive holds {len(members)} files; at most "
                f"{MAX_ARCHIVE_MEMBERS} are read"
            )
        for info in members:
            if info.is_dir() or not _wanted(info.filename, info.file_size, files, max_member_bytes):
                continue
            try:  # reads at most file_size bytes, whatever the compressed stream holds
                files[info.filename.rsplit("/", 1)[-1]] = archive.read(info)
            except (zipfile.BadZipFile, OSError, NotImplementedError, zlib.error) as error:
                raise IncompatiblePrefixError(f"PEFT adapter: {info.filename}: {error}") from error
    return files


def read_peft_adapter_tar(
    data: bytes, *, max_member_bytes: int = MAX_ZIP_MEMBER_BYTES
) -> dict[str, bytes]:
    """The adapter files of a tar (plain or gzip/bzip2/xz-compressed), each member's size
    checked from its header before it is read; only regular files are read (no links)."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for count, member in enumerate(archive, start=1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise IncompatiblePrefixError(
                        f"PEFT adapter: the archive holds more than {MAX_ARCHIVE_MEMBERS} files"
                    )
                if member.isdir() or not _wanted(member.name, member.size, files, max_member_bytes):
                    continue
                content = archive.extractfile(member) if member.isfile() else None
                if content is None:
                    raise IncompatiblePrefixError(
                        f"PEFT adapter: {member.name} is not a regular file"
                    )
                files[member.name.rsplit("/", 1)[-1]] = content.read(member.size)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        raise IncompatiblePrefixError(f"PEFT adapter: not a readable tar file: {error}") from None
    return files


def read_peft_adapter_archive(
    data: bytes, *, max_member_bytes: int = MAX_ZIP_MEMBER_BYTES
) -> dict[str, bytes]:
    """The adapter files of an uploaded zip or tar (the adapter directory, packed)."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        return read_peft_adapter_zip(data, max_member_bytes=max_member_bytes)
    try:
        tarfile.open(fileobj=io.BytesIO(data), mode="r:*").close()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError):
        raise IncompatiblePrefixError(
            "PEFT adapter: not a zip or tar archive (pack the adapter directory with "
            "`zip -r` or `tar -czf`)"
        ) from None
    return read_peft_adapter_tar(data, max_member_bytes=max_member_bytes)
