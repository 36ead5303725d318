"""The prefix artifact and its file format: one safetensors file per prefix version.

The file holds one tensor, ``self_attn.key_values`` of shape
``(layers, 2, kv_heads, prefix_length, head_dim)`` in float32, float16 or bfloat16 — the
materialized prefix ``P`` only, never ``P'`` or the reparameterization MLP — and string
metadata: format version, base-model fingerprint, architecture, prefix length, dtype,
dimensions, prompt format, training hyperparameters and metrics (JSON), creation time, and
for a prefix built on a base prefix ``base_prefix_id``, ``base_fingerprint`` and
``base_mode`` (``warm_start`` or ``stack``; absent in files without a base, older ones too).

Encoder-decoder prefixes (BART, T5) hold their three sub-prefixes on the layer axis of the
same tensor; the metadata then also says ``kind: encoder-decoder`` and the ``layout``
(JSON ``[["encoder", Le], ["decoder", Ld], ["cross", Ld]]``). Files written before these
keys existed have neither and load as decoder-only prefixes, unchanged; decoder-only files
now say ``kind: decoder-only`` and no layout.

Loading checks everything it can before a prefix reaches a model: exactly the expected
tensor, its shape and layout against the metadata and against the model, an allowed dtype,
finite values, and the base-model fingerprint — a prefix trained for another model is
refused. Any bad file is an :class:`IncompatiblePrefixError` naming it. Writes are atomic
(a temporary file, then a rename).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import PretrainedConfig

from common.architectures import DECODER_ONLY, ENCODER_DECODER, PrefixShape, is_encoder_decoder
from common.errors import IncompatiblePrefixError

FORMAT_VERSION = "1"
TENSOR_NAME = "self_attn.key_values"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# How an example becomes tokens (common/data.py); stored so generation formats inputs the
# same way training did.
PROMPT_FORMAT = "input-sep-output-eos-v1"
# Encoder-decoder models: the encoder reads ``input <eos>``, the decoder ``<start> output``.
SEQ2SEQ_PROMPT_FORMAT = "encoder-input-eos-decoder-output-eos-v1"
# How a prefix uses its base prefix (common/base_prefix.py); None: it has none.
BASE_MODES = ("warm_start", "stack")


def prompt_format(config: PretrainedConfig) -> str:
    """The prompt format training uses for this model (and generation expects)."""
    return SEQ2SEQ_PROMPT_FORMAT if is_encoder_decoder(config) else PROMPT_FORMAT


@dataclass
class Prefix:
    """A trained prefix: ``key_values`` ``(layers, 2, kv_heads, P, head_dim)`` plus metadata.
    ``sections`` is the encoder-decoder layout of the layer axis (empty: decoder-only)."""

    key_values: torch.Tensor
    base_model_fingerprint: str
    architecture: str
    prompt_format: str = PROMPT_FORMAT
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    sections: tuple[tuple[str, int], ...] = ()
    # The base prefix this one builds on (common/base_prefix.py): its id, the sha256 of its
    # key/values, and how ("warm_start" or "stack"); all None for a prefix without a base.
    base_prefix_id: str | None = None
    base_fingerprint: str | None = None
    base_mode: str | None = None

    @property
    def prefix_length(self) -> int:
        return int(self.key_values.shape[3])

    @property
    def dtype_name(self) -> str:
        return str(self.key_values.dtype).removeprefix("torch.")

    @property
    def shape(self) -> PrefixShape:
        layers, _, kv_heads, _, head_dim = self.key_values.shape
        return PrefixShape(
            layers=layers, kv_heads=kv_heads, head_dim=head_dim, sections=self.sections
        )


def prefix_to_bytes(prefix: Prefix) -> bytes:
    if prefix.dtype_name not in DTYPES:
        raise IncompatiblePrefixError(
            f"prefix dtype must be one of {', '.join(DTYPES)}, got {prefix.dtype_name}"
        )
    shape = prefix.shape
    if shape.sections and sum(layers for _, layers in shape.sections) != shape.layers:
        raise IncompatiblePrefixError(
            f"prefix layout {shape.describe()} does not add up to its {shape.layers} layers"
        )
    metadata = {
        "format_version": FORMAT_VERSION,
        "base_model_fingerprint": prefix.base_model_fingerprint,
        "architecture": prefix.architecture,
        "prefix_length": str(prefix.prefix_length),
        "dtype": prefix.dtype_name,
        "layers": str(shape.layers),
        "kv_heads": str(shape.kv_heads),
        "head_dim": str(shape.head_dim),
        "prompt_format": prefix.prompt_format,
        "hyperparameters": json.dumps(prefix.hyperparameters, sort_keys=True, default=str),
        "metrics": json.dumps(prefix.metrics, sort_keys=True, default=str),
        "created_at": prefix.created_at,
        "kind": shape.kind,
    }
    if shape.sections:
        metadata["layout"] = json.dumps([list(section) for section in shape.sections])
    if prefix.base_mode is not None and prefix.base_mode not in BASE_MODES:
        raise IncompatiblePrefixError(
            f"base mode must be one of {', '.join(BASE_MODES)}, got {prefix.base_mode!r}"
        )
    for name in ("base_prefix_id", "base_fingerprint", "base_mode"):
        if getattr(prefix, name) is not None:  # absent keys: no base (and older files)
            metadata[name] = str(getattr(prefix, name))
    return save_safetensors({TENSOR_NAME: prefix.key_values.detach().contiguous()}, metadata)


def _read_metadata(data: bytes, source: str) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header size, then a JSON header.
    if len(data) < 8:
        raise IncompatiblePrefixError(f"{source}: not a prefix file (truncated header)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise IncompatiblePrefixError(f"{source}: not a prefix file (truncated header)")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as error:
        raise IncompatiblePrefixError(f"{source}: not a prefix file ({error})") from error
    except RecursionError:
        raise IncompatiblePrefixError(
            f"{source}: not a prefix file (header nested too deeply)"
        ) from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise IncompatiblePrefixError(f"{source}: no prefixd metadata in the file")
    return metadata


def prefix_from_bytes(
    data: bytes,
    *,
    source: str = "prefix",
    expected_fingerprint: str | None = None,
    expected_shape: PrefixShape | None = None,
) -> Prefix:
    """Parse and validate a prefix file. ``source`` names it in error messages."""
    metadata = _read_metadata(data, source)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise IncompatiblePrefixError(
            f"{source}: prefix format version {metadata.get('format_version')!r} is not "
            f"supported (expected {FORMAT_VERSION!r})"
        )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise IncompatiblePrefixError(f"{source}: corrupt prefix file ({error})") from error
    if set(tensors) != {TENSOR_NAME}:
        raise IncompatiblePrefixError(
            f"{source}: expected exactly one tensor {TENSOR_NAME!r}, got {sorted(tensors)}"
        )
    key_values = tensors[TENSOR_NAME]
    try:
        declared = (
            int(metadata["layers"]),
            2,
            int(metadata["kv_heads"]),
            int(metadata["prefix_length"]),
            int(metadata["head_dim"]),
        )
        hyperparameters = json.loads(metadata.get("hyperparameters", "{}"))
        metrics = json.loads(metadata.get("metrics", "{}"))
        fingerprint = metadata["base_model_fingerprint"]
        architecture = metadata["architecture"]
        sections = _layout(metadata)
    except (KeyError, ValueError, TypeError, RecursionError) as error:
        raise IncompatiblePrefixError(f"{source}: invalid metadata ({error})") from error
    kind = metadata.get("kind", DECODER_ONLY)  # files from before encoder-decoder support
    if kind not in (DECODER_ONLY, ENCODER_DECODER) or (kind == ENCODER_DECODER) != bool(sections):
        raise IncompatiblePrefixError(
            f"{source}: invalid metadata (kind {kind!r} with layout {sections or 'none'}; "
            f"expected {DECODER_ONLY!r} without a layout or {ENCODER_DECODER!r} with one)"
        )
    base_mode = metadata.get("base_mode")
    if base_mode is not None and base_mode not in BASE_MODES:
        raise IncompatiblePrefixError(
            f"{source}: invalid metadata (base_mode {base_mode!r}; expected one of "
            f"{', '.join(BASE_MODES)})"
        )
    if base_mode == "stack" and not metadata.get("base_fingerprint"):
        raise IncompatiblePrefixError(
            f"{source}: invalid metadata (a stacked prefix without its base's fingerprint)"
        )
    if sections and sum(layers for _, layers in sections) != declared[0]:
        raise IncompatiblePrefixError(
            f"{source}: invalid metadata (layout {sections} does not add up to "
            f"{declared[0]} layers)"
        )
    if tuple(key_values.shape) != declared:
        raise IncompatiblePrefixError(
            f"{source}: tensor shape {tuple(key_values.shape)} does not match the metadata {declared}"
        )
    if min(declared) < 1:
        raise IncompatiblePrefixError(
            f"{source}: prefix length and dimensions must be at least 1, got shape {declared}"
        )
    dtype = str(key_values.dtype).removeprefix("torch.")
    if dtype not in DTYPES or metadata.get("dtype") != dtype:
        raise IncompatiblePrefixError(
            f"{source}: dtype must be one of {', '.join(DTYPES)} and match the metadata; "
            f"got {dtype} (metadata says {metadata.get('dtype')!r})"
        )
    if not bool(torch.isfinite(key_values).all()):
        raise IncompatiblePrefixError(f"{source}: the prefix holds values that are not finite")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise IncompatiblePrefixError(
            f"{source}: this prefix was trained for another base model "
            f"(fingerprint {fingerprint[:12]}…, the loaded model is {expected_fingerprint[:12]}…)"
        )
    if expected_shape is not None:
        expected = expected_shape.tensor_shape(declared[3])
        if sections != expected_shape.sections:
            got = PrefixShape(declared[0], declared[2], declared[4], sections)
            raise IncompatiblePrefixError(
                f"{source}: prefix layout {got.describe()} ({kind}) does not fit the model "
                f"(expected {expected_shape.describe()}, {expected_shape.kind})"
            )
        if declared != expected:
            raise IncompatiblePrefixError(
                f"{source}: prefix shape {declared} does not fit the model (expected {expected})"
            )
    return Prefix(
        key_values=key_values,
        base_model_fingerprint=fingerprint,
        architecture=architecture,
        prompt_format=metadata.get("prompt_format", PROMPT_FORMAT),
        hyperparameters=hyperparameters,
        metrics=metrics,
        created_at=metadata.get("created_at", ""),
        sections=sections,
        base_prefix_id=metadata.get("base_prefix_id"),
        base_fingerprint=metadata.get("base_fingerprint"),
        base_mode=base_mode,
    )


def _layout(metadata: dict[str, str]) -> tuple[tuple[str, int], ...]:
    """The ``layout`` metadata as sections; ``()`` when absent (decoder-only)."""
    if "layout" not in metadata:
        return ()
    sections = tuple((str(name), int(layers)) for name, layers in json.loads(metadata["layout"]))
    if [name for name, _ in sections] != ["encoder", "decoder", "cross"] or any(
        layers < 1 for _, layers in sections
    ):
        raise ValueError(f"layout must be encoder, decoder, cross with layers ≥ 1, got {sections}")
    return sections


def save_prefix(prefix: Prefix, path: str | Path) -> Path:
    """Write atomically (temp file + rename): a reader never sees a half-written prefix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = prefix_to_bytes(prefix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_prefix(
    path: str | Path,
    *,
    expected_fingerprint: str | None = None,
    expected_shape: PrefixShape | None = None,
) -> Prefix:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise IncompatiblePrefixError(
            f"cannot read prefix file {path}: {error.strerror}"
        ) from error
    return prefix_from_bytes(
        data,
        source=str(path),
        expected_fingerprint=expected_fingerprint,
        expected_shape=expected_shape,
    )
