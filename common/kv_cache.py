"""The only module that talks to transformers' Cache API.

A batch of rows, each with its own prefix (or none), becomes one ``DynamicCache`` plus a
2-D attention mask and per-row position ids:

    cache slot:   | row's prefix (P_i) | unused (Pmax - P_i) | input, left-padded (Tmax) |
    mask:         |        1           |          0          |  0 … 0   1 … 1 (T_i)      |
    position ids:                                             P_i, P_i + 1, …

so each row's real tokens start at position ``P_i`` — exactly as in training, where the
prefix occupies positions ``0 … P-1`` — whatever the other rows' prefix and input lengths.

transformers' Cache API changes between releases (pyproject pins a tested range); keep
every use of it here, behind these few functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig

from common.architectures import PrefixShape


def stack_prefixes(
    prefixes: Sequence[torch.Tensor | None],
    shape: PrefixShape,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-row prefixes to the longest one.

    Args:
        prefixes: per row, a tensor ``(layers, 2, kv_heads, P_i, head_dim)`` or ``None``.
    Returns:
        ``key_values`` of shape ``(layers, 2, B, kv_heads, Pmax, head_dim)`` (a fresh tensor:
        decoding never touches the callers' prefixes) and ``prefix_mask`` ``(B, Pmax)``.
    """
    lengths = [0 if p is None else p.shape[3] for p in prefixes]
    batch, longest = len(prefixes), max(lengths, default=0)
    key_values = torch.zeros(
        (shape.layers, 2, batch, shape.kv_heads, longest, shape.head_dim),
        dtype=dtype,
        device=device,
    )
    prefix_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, (prefix, length) in enumerate(zip(prefixes, lengths, strict=True)):
        if prefix is None or length == 0:
            continue
        key_values[:, :, row, :, :length] = prefix.to(
            device=device, dtype=dtype
        )  # (layers, 2, kv, P_i, hs)
        prefix_mask[row, :length] = 1
    return key_values, prefix_mask


def expand_prefix(prefix: torch.Tensor, batch: int) -> torch.Tensor:
    """One prefix ``(layers, 2, kv_heads, P, hs)`` shared by ``batch`` rows, without copying
    (training: gradients from every row flow back into the same tensor)."""
    return prefix.unsqueeze(2).expand(-1, -1, batch, -1, -1, -1)  # (layers, 2, B, kv, P, hs)


def prefix_cache(key_values: torch.Tensor | None, config: PretrainedConfig) -> DynamicCache:
    """A cache pre-filled with ``key_values`` ``(layers, 2, B, kv_heads, P, head_dim)``.

    A new cache object per call: ``forward``/decoding extends caches in place, so one must
    never be reused across calls."""
    if key_values is None or key_values.shape[-2] == 0:
        return DynamicCache(config=config)
    layers = [(key_values[i, 0], key_values[i, 1]) for i in range(key_values.shape[0])]
    return DynamicCache(layers, config=config)


def _layers(cache: DynamicCache) -> list:
    for layer in cache.layers:
        if type(layer).__name__ != "DynamicLayer":
            # Sliding-window layers drop old positions themselves; merging batches of them
            # would misalign rows. No supported family uses them by default.
            raise NotImplementedError(f"cannot merge caches with {type(layer).__name__} layers")
    return list(cache.layers)


def pad_left(cache: DynamicCache, slots: int) -> None:
    """Insert ``slots`` empty (to-be-masked) positions before every row's cached positions."""
    if slots <= 0:
        return
    for layer in _layers(cache):
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, slots, 0))  # (B, kv, slots+L, hs)
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, slots, 0))


def trim_left(cache: DynamicCache, slots: int) -> None:
    """Drop the first ``slots`` positions (when they are masked in every row)."""
    if slots <= 0:
        return
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, slots:]
        layer.values = layer.values[:, :, slots:]


def concat_rows(first: DynamicCache, second: DynamicCache) -> DynamicCache:
    """Rows of ``second`` appended to ``first`` (same cache length: pad the shorter first)."""
    for mine, theirs in zip(_layers(first), _layers(second), strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)  # (B1 + B2, kv, L, hs)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
    return first


def reorder_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Select (and repeat) batch rows of the cache in place: beam reordering, or dropping
    rows that finished decoding."""
    keys = getattr(cache.layers[0], "keys", None) if cache.layers else None
    device = keys.device if isinstance(keys, torch.Tensor) else rows.device
    cache.reorder_cache(rows.to(device))  # type: ignore[arg-type]  # LongTensor is not a real type


def cache_key_values(cache: DynamicCache) -> torch.Tensor:
    """The inverse of :func:`prefix_cache`: ``(layers, 2, B, kv_heads, T, head_dim)``."""
    pairs = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None:
            raise ValueError(f"cache layer {type(layer).__name__} holds no keys/values")
        pairs.append(torch.stack([keys, values]))
    return torch.stack(pairs)  # (layers, 2, B, kv_heads, T, hs)
