"""Prefix-tuning of encoder-decoder models (BART, T5): ``z = [PREFIX; x; PREFIX'; y]``.

A prefix of an encoder-decoder model has three sub-prefixes of the same length ``P``
(:class:`~common.architectures.PrefixShape` ``sections``): the encoder's self-attention, the
decoder's self-attention and the decoder's cross-attention. Two of them reach the model
through the cache (:func:`common.kv_cache.encoder_decoder_cache`): the decoder's
self-attention cache is pre-filled with its prefix, and the cross-attention cache with the
cross-attention prefix, to which the model appends the projected encoder outputs on the
first decoder pass. The encoder mask covers ``| prefix | input |``, so the same 2-D mask
serves the encoder's self-attention and the decoder's cross-attention.

transformers needs help in two places, and this module is the only one that gives it:

* **The encoder takes no cache.** BART's and T5's encoder self-attention modules accept
  ``past_key_values`` (they share their class with the decoder's), but the encoder stacks
  never pass one (T5 even sets it to ``None``). A forward pre-hook on each encoder
  self-attention module (named by the family table) hands it a fresh cache pre-filled with
  the encoder prefix, so the module prepends the prefix to its keys/values exactly as a
  decoder does — and T5 computes its relative position bias with the prefix at positions
  ``0 … P-1`` before the input, as for a decoder's cached positions.
* **BART's decoder takes no per-row positions**: it numbers decoder tokens from the cache
  length, which is ``Pmax`` (plus merge padding) for every row of a batch whose prefixes
  differ in length. A forward hook on its position table replaces the embeddings with
  those of each row's own positions ``P_i, P_i + 1, …`` (T5's positions are relative to
  cache slots, which the right-aligned layout keeps as they are for a row alone).

The hooks are installed once per model and do nothing unless the calling thread (or
asyncio task) set a prefix through :func:`_calling_with` — a ``ContextVar``, so concurrent
calls on one model (trainers, a serving thread) each see only their own rows' prefixes,
and nothing is stored on the shared modules per call. The stored prefix is never written:
caches are built fresh per call and grow by concatenation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import EncoderDecoderCache, PreTrainedModel

from common.architectures import family_of, prefix_shape
from common.data import Batch
from common.kv_cache import (
    cache_key_values,
    encoder_decoder_cache,
    encoder_decoder_key_values,
    plain_cache,
    sub_prefix,
)


@dataclass(frozen=True)
class _CallState:
    encoder_cache: Any = None  # a DynamicCache holding the encoder prefix, or None
    decoder_positions: torch.Tensor | None = None  # (B, T) positions of the decoder tokens


_STATE: ContextVar[_CallState | None] = ContextVar("prefixd_encoder_decoder", default=None)
_INSTALL_LOCK = threading.Lock()
_INSTALLED = "_prefixd_encoder_decoder_hooks"


def _encoder_prefix_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    state = _STATE.get()
    if state is None or state.encoder_cache is None:
        return None
    return args, {**kwargs, "past_key_values": state.encoder_cache}


def install_hooks(model: PreTrainedModel) -> None:
    """Register the (idle unless asked) hooks on ``model`` once; safe to call every time."""
    if getattr(model, _INSTALLED, False):
        return
    family = family_of(model.config)
    with _INSTALL_LOCK:
        if getattr(model, _INSTALLED, False):
            return
        encoder, decoder = model.get_encoder(), model.get_decoder()
        layers = prefix_shape(model.config).section("encoder")
        for i in range(layers.stop - layers.start):
            attention = encoder.get_submodule(family.encoder_self_attention.format(i=i))
            attention.register_forward_pre_hook(_encoder_prefix_hook, with_kwargs=True)
        if family.decoder_positions:
            embed = family.position_embedding
            assert embed is not None, "a family with decoder_positions needs position_embedding"

            def positions_hook(
                module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
            ) -> Any:
                state = _STATE.get()
                if state is None or state.decoder_positions is None:
                    return None
                positions = state.decoder_positions.to(output.device)  # (B, T)
                return embed(module, positions).to(output.dtype)  # (B, T, d_model)

            decoder.get_submodule(family.decoder_positions).register_forward_hook(positions_hook)
        setattr(model, _INSTALLED, True)


@contextmanager
def _calling_with(state: _CallState) -> Iterator[None]:
    token = _STATE.set(state)
    try:
        yield
    finally:
        _STATE.reset(token)


def encode(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    encoder_prefix: torch.Tensor | None,
    *,
    filled: list[Any] | None = None,
) -> torch.Tensor:
    """Run the encoder behind its prefix.

    Args:
        input_ids: ``(B, T)`` encoder tokens, right-padded.
        attention_mask: ``(B, P + T)`` over ``| prefix slots | input |`` (``(B, T)`` when
            there is no prefix).
        encoder_prefix: ``(encoder layers, 2, B, kv_heads, P, head_dim)``, or ``None`` /
            ``P == 0`` for none.
        filled: if given, receives the encoder's cache after the call (prefix + the input's
            own keys/values per layer): how ``text:`` initialization reads them.
    Returns:
        the encoder's last hidden state ``(B, T, d_model)``.
    """
    install_hooks(model)
    cache = plain_cache(encoder_prefix)
    with _calling_with(_CallState(encoder_cache=cache)):
        hidden = model.get_encoder()(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
    if filled is not None:
        filled.append(cache)
    return hidden


def decode(
    model: PreTrainedModel,
    *,
    encoder_hidden: torch.Tensor,
    cross_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    decoder_mask: torch.Tensor,
    cache: EncoderDecoderCache,
    positions: torch.Tensor,
) -> torch.Tensor:
    """One decoder pass; returns logits ``(B, T, vocab)``.

    Args:
        encoder_hidden: ``(B, S, d_model)``; once every layer's cross-attention keys/values
            are cached, only its batch size matters (any ``S``).
        cross_mask: ``(B, cross cache length)`` over ``| cross prefix | encoder tokens |``.
        decoder_input_ids: ``(B, T)`` new decoder tokens.
        decoder_mask: ``(B, self cache length + T)``.
        cache: the decoder's :class:`EncoderDecoderCache`, extended in place.
        positions: ``(B, T)`` each new token's position (``P_i …`` for row ``i``).
    """
    install_hooks(model)
    with _calling_with(_CallState(decoder_positions=positions)):
        return model(
            encoder_outputs=(encoder_hidden,),
            attention_mask=cross_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_mask,
            past_key_values=cache,
            use_cache=True,
        ).logits


def seq2seq_logits(
    model: PreTrainedModel,
    batch: Batch,
    *,
    encoder_prefix: torch.Tensor | None,
    decoder_prefix: torch.Tensor | None,
    cross_prefix: torch.Tensor | None,
) -> torch.Tensor:
    """Decoder logits ``(B, Td, vocab)`` of a right-padded training batch behind
    sub-prefixes that each cover every row (``(section layers, 2, B, kv, P_s, hs)``, or
    ``None`` for none; their lengths may differ, e.g. for the PEFT comparison).

    The encoder's real tokens keep positions ``0 …`` (BART numbers only real tokens; T5
    sees the prefix before them); the decoder's start at ``P`` as in decoder-only models."""
    assert batch.decoder_input_ids is not None and batch.decoder_attention_mask is not None
    device = next(model.parameters()).device
    batch_size, target_length = batch.decoder_input_ids.shape

    def ones(prefix: torch.Tensor | None) -> torch.Tensor:
        length = 0 if prefix is None else prefix.shape[-2]
        return torch.ones((batch_size, length), dtype=torch.long)

    encoder_mask = torch.cat([ones(encoder_prefix), batch.attention_mask], dim=1)  # (B, Pe+Te)
    hidden = encode(model, batch.input_ids.to(device), encoder_mask.to(device), encoder_prefix)
    cross_mask = torch.cat([ones(cross_prefix), batch.attention_mask], dim=1)  # (B, Pc + Te)
    decoder_mask = torch.cat([ones(decoder_prefix), batch.decoder_attention_mask], dim=1)
    start = 0 if decoder_prefix is None else decoder_prefix.shape[-2]
    positions = torch.arange(start, start + target_length).expand(batch_size, -1)  # (B, Td)
    return decode(
        model,
        encoder_hidden=hidden,
        cross_mask=cross_mask.to(device),
        decoder_input_ids=batch.decoder_input_ids.to(device),
        decoder_mask=decoder_mask.to(device),
        cache=encoder_decoder_cache(decoder_prefix, cross_prefix),
        positions=positions.to(device),
    )


def prefix_seq2seq_logits(
    model: PreTrainedModel, key_values: torch.Tensor, batch: Batch
) -> torch.Tensor:
    """:func:`seq2seq_logits` behind one full prefix ``(layers, 2, B, kv, P, hs)``."""
    shape = prefix_shape(model.config)
    return seq2seq_logits(
        model,
        batch,
        encoder_prefix=sub_prefix(key_values, shape, "encoder"),
        decoder_prefix=sub_prefix(key_values, shape, "decoder"),
        cross_prefix=sub_prefix(key_values, shape, "cross"),
    )


@torch.no_grad()
def encoder_decoder_text_key_values(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """The frozen model's own keys/values for the tokens ``ids`` (``L`` of them), laid out
    as a prefix ``(layers, 2, kv_heads, L, head_dim)``: the encoder's self-attention
    keys/values of the text, the decoder's self-attention keys/values of the text fed as
    decoder input, and the cross-attention keys/values (the encoder outputs, projected).
    The paper's initialization from real words, for encoder-decoder models."""
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)  # (1, L)
    mask = torch.ones_like(tokens)
    filled: list[Any] = []
    hidden = encode(model, tokens, mask, None, filled=filled)
    cache = encoder_decoder_cache(None, None)
    decode(
        model,
        encoder_hidden=hidden,
        cross_mask=mask,
        decoder_input_ids=tokens,
        decoder_mask=mask,
        cache=cache,
        positions=torch.arange(len(ids), device=device).unsqueeze(0),
    )
    encoder = cache_key_values(filled[0])  # (Le, 2, 1, kv, L, hs)
    decoder, cross = encoder_decoder_key_values(cache)  # (Ld, 2, 1, kv, L, hs) each
    return torch.cat([encoder, decoder, cross])[:, :, 0].contiguous()  # (layers, 2, kv, L, hs)
