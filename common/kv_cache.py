"""The only module that talks to transformers' Cache API.

A batch of rows, each with its own prefix (or none), becomes one ``DynamicCache`` plus a
2-D attention mask and per-row position ids:

    cache slot:   | row's prefix (P_i) | unused (Pmax - P_i) | input, left-padded (Tmax) |
    mask:         |        1           |          0          |  0 … 0   1 … 1 (T_i)      |
    position ids:                                             P_i, P_i + 1, …

so each row's real tokens start at position ``P_i`` — exactly as in training, where the
prefix occupies positions ``0 … P-1`` — whatever the other rows' prefix and input lengths.

Encoder-decoder models (BART, T5) use an ``EncoderDecoderCache``: the decoder's
self-attention cache is laid out as above, except that prefixes are *right-aligned*
(``| unused | row's prefix | decoder tokens |``, see :func:`pad_prefixes`) so that each
row's content is contiguous and relative positions (T5) see the distances they see alone;
the cross-attention cache starts with the cross-attention prefix, and the model appends the
projected encoder outputs to it on the first decoder pass (:func:`encoder_decoder_cache`).

transformers' Cache API changes between releases (pyproject pins a tested range); keep
every use of it here, behind these few functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache, PretrainedConfig

from common.architectures import PrefixShape


def pad_prefixes(
    prefixes: Sequence[torch.Tensor | None],
    shape: PrefixShape,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    align_right: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-row prefixes to the longest one.

    Args:
        prefixes: per row, a tensor ``(layers, 2, kv_heads, P_i, head_dim)`` or ``None``.
        align_right: put each prefix in the last ``P_i`` slots (unused slots first), so the
            row's prefix and tokens are contiguous: what relative positions (T5) need.
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
        slots = slice(longest - length, longest) if align_right else slice(0, length)
        key_values[:, :, row, :, slots] = prefix.to(
            device=device, dtype=dtype
        )  # (layers, 2, kv, P_i, hs)
        prefix_mask[row, slots] = 1
    return key_values, prefix_mask


def sub_prefix(key_values: torch.Tensor, shape: PrefixShape, name: str) -> torch.Tensor:
    """One encoder-decoder sub-prefix (``encoder``, ``decoder`` or ``cross``) of a prefix
    ``(layers, 2, …)``: a view of its layers ``(section layers, 2, …)``, no copy."""
    return key_values[shape.section(name)]


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


def plain_cache(key_values: torch.Tensor | None) -> DynamicCache:
    """A cache of plain (full-attention) layers pre-filled with ``key_values``
    ``(layers, 2, B, kv_heads, P, head_dim)``; no config, so the layer count is the
    tensor's (an encoder's or a decoder's, whichever the config would not say)."""
    if key_values is None or key_values.shape[-2] == 0:
        return DynamicCache()
    return DynamicCache([(key_values[i, 0], key_values[i, 1]) for i in range(key_values.shape[0])])


def encoder_decoder_cache(
    self_key_values: torch.Tensor | None, cross_key_values: torch.Tensor | None
) -> EncoderDecoderCache:
    """A fresh decoder cache: self-attention pre-filled with ``self_key_values`` and
    cross-attention with ``cross_key_values`` (each ``(decoder layers, 2, B, kv, P, hs)``
    or ``None``).

    ``EncoderDecoderCache`` marks a layer whose cross-attention cache is non-empty as
    "already computed" (``is_updated``) and would then never project the encoder outputs:
    the flags are cleared here, so the first decoder pass appends the projected encoder
    outputs after the cross-attention prefix (keys ``| prefix | encoder tokens |``, covered
    by the encoder attention mask) and sets them again."""
    cache = EncoderDecoderCache(plain_cache(self_key_values), plain_cache(cross_key_values))
    for layer in cache.is_updated:
        cache.is_updated[layer] = False
    return cache


def cross_attention_ready(cache: EncoderDecoderCache, layers: int) -> bool:
    """Whether every decoder layer's cross-attention keys/values are computed and cached
    (after the first decoder pass): later passes may then skip the encoder outputs."""
    return all(cache.is_updated.get(layer, False) for layer in range(layers))


def _layers(cache: DynamicCache | EncoderDecoderCache) -> list[Any]:
    """The self-attention layers: the ones that grow by one slot per decoded token."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    for layer in cache.layers:
        if type(layer).__name__ != "DynamicLayer":
            # Sliding-window layers drop old positions themselves; merging batches of them
            # would misalign rows. No supported family uses them by default.
            raise NotImplementedError(f"cannot merge caches with {type(layer).__name__} layers")
    return list(cache.layers)


def pad_left(cache: DynamicCache | EncoderDecoderCache, slots: int) -> None:
    """Insert ``slots`` empty (to-be-masked) positions before every row's cached positions."""
    if slots <= 0:
        return
    for layer in _layers(cache):
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, slots, 0))  # (B, kv, slots+L, hs)
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, slots, 0))


def trim_left(cache: DynamicCache | EncoderDecoderCache, slots: int) -> None:
    """Drop the first ``slots`` positions (when they are masked in every row)."""
    if slots <= 0:
        return
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, slots:]
        layer.values = layer.values[:, :, slots:]


def _cross_layers(cache: EncoderDecoderCache) -> list[Any]:
    return list(cache.cross_attention_cache.layers)


def pad_cross_right(cache: EncoderDecoderCache, slots: int) -> None:
    """Append ``slots`` empty (to-be-masked) cross-attention positions to every row, so two
    batches with different encoder lengths can be stacked (cross-attention has no positions:
    where the masked slots sit does not matter)."""
    if slots <= 0:
        return
    for layer in _cross_layers(cache):
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, 0, slots))  # (B, kv, L+slots, hs)
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, 0, slots))


def concat_rows(
    first: DynamicCache | EncoderDecoderCache, second: DynamicCache | EncoderDecoderCache
) -> DynamicCache | EncoderDecoderCache:
    """Rows of ``second`` appended to ``first`` (same cache lengths: pad the shorter first;
    for encoder-decoder caches, both the self- and the cross-attention cache)."""
    pairs = list(zip(_layers(first), _layers(second), strict=True))
    if isinstance(first, EncoderDecoderCache) and isinstance(second, EncoderDecoderCache):
        pairs += list(zip(_cross_layers(first), _cross_layers(second), strict=True))
    for mine, theirs in pairs:
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)  # (B1 + B2, kv, L, hs)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
    return first


def reorder_rows(cache: DynamicCache | EncoderDecoderCache, rows: torch.Tensor) -> None:
    """Select (and repeat) batch rows of the cache in place: beam reordering, or dropping
    rows that finished decoding."""
    layers = _layers(cache)
    keys = getattr(layers[0], "keys", None) if layers else None
    device = keys.device if isinstance(keys, torch.Tensor) else rows.device
    cache.reorder_cache(rows.to(device))  # type: ignore[arg-type]  # LongTensor is not a real type


def encoder_decoder_key_values(cache: EncoderDecoderCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Self- and cross-attention key/values of a filled decoder cache, each
    ``(decoder layers, 2, B, kv_heads, T, head_dim)``."""
    return (
        cache_key_values(cache.self_attention_cache),
        cache_key_values(cache.cross_attention_cache),
    )


def cache_key_values(cache: DynamicCache) -> torch.Tensor:
    """The inverse of :func:`prefix_cache`: ``(layers, 2, B, kv_heads, T, head_dim)``."""
    pairs = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None:
            raise ValueError(f"cache layer {type(layer).__name__} holds no keys/values")
        pairs.append(torch.stack([keys, values]))
    return torch.stack(pairs)  # (layers, 2, B, kv_heads, T, hs)
