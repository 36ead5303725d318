"""Model families prefix-tuning supports, and the shape of a prefix for each.

Family differences live in this one table (not in branches spread over the code): how to
read the number of layers, key/value heads and head size from a config. A prefix holds
``num_key_value_heads`` heads — not ``num_attention_heads`` — so grouped-query attention
models (Llama 2/3, SmolLM2, Mistral, Qwen2) get the smaller prefix they actually cache.

Encoder-decoder families (BART, T5: the paper's summarization setting,
``z = [PREFIX; x; PREFIX'; y]``) get three sub-prefixes of the same length, stacked on the
layer axis of one tensor: the encoder's self-attention (``encoder``, one entry per encoder
layer), the decoder's self-attention (``decoder``) and the decoder's cross-attention
(``cross``, one entry per decoder layer each). :attr:`PrefixShape.sections` records that
layout; a decoder-only prefix has no sections (every layer is decoder self-attention).
The table also names, per encoder-decoder family, the two places its transformers code
needs help (:mod:`common.encoder_decoder`): the encoder's self-attention modules, and a
learned absolute decoder position table (BART) that cannot take per-row positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
)

from common.errors import IncompatiblePrefixError


@dataclass(frozen=True)
class PrefixShape:
    """Dimensions of one prefix: a tensor ``(layers, 2, kv_heads, length, head_dim)``;
    index 0 of the second axis holds keys, index 1 values."""

    layers: int
    kv_heads: int
    head_dim: int
    # Encoder-decoder: ((name, layers), ...) in layer-axis order, e.g.
    # (("encoder", 6), ("decoder", 6), ("cross", 6)); empty for a decoder-only prefix.
    sections: tuple[tuple[str, int], ...] = ()

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def kind(self) -> str:
        return ENCODER_DECODER if self.sections else DECODER_ONLY

    def section(self, name: str) -> slice:
        """The layer-axis range of sub-prefix ``name`` (``encoder``, ``decoder``, ``cross``)."""
        start = 0
        for section, layers in self.sections:
            if section == name:
                return slice(start, start + layers)
            start += layers
        raise KeyError(f"prefix has no {name!r} section (sections: {self.sections})")

    def describe(self) -> str:
        """Human-readable layout for error messages, e.g. ``encoder 2 + decoder 2 + cross 2``."""
        if not self.sections:
            return f"{self.layers} decoder layers"
        return " + ".join(f"{name} {layers}" for name, layers in self.sections)

    def tensor_shape(self, length: int) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.kv_heads, length, self.head_dim)


def _grouped_query(config: PretrainedConfig) -> PrefixShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return PrefixShape(
        layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


def _gpt2(config: PretrainedConfig) -> PrefixShape:
    return PrefixShape(
        layers=config.n_layer, kv_heads=config.n_head, head_dim=config.n_embd // config.n_head
    )


def _encoder_decoder_shape(
    config: PretrainedConfig,
    *,
    encoder_layers: int,
    decoder_layers: int,
    encoder_heads: int,
    decoder_heads: int,
    head_dim: int,
) -> PrefixShape:
    if encoder_heads != decoder_heads:
        # One tensor holds the three sub-prefixes, so they must share the head layout.
        raise IncompatiblePrefixError(
            f"{config.model_type}: encoder and decoder must have the same number of attention "
            f"heads for prefix-tuning, got encoder {encoder_heads} and decoder {decoder_heads}"
        )
    return PrefixShape(
        layers=encoder_layers + 2 * decoder_layers,
        kv_heads=encoder_heads,
        head_dim=head_dim,
        sections=(
            ("encoder", encoder_layers),
            ("decoder", decoder_layers),
            ("cross", decoder_layers),
        ),
    )


def _bart(config: PretrainedConfig) -> PrefixShape:
    return _encoder_decoder_shape(
        config,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        encoder_heads=config.encoder_attention_heads,
        decoder_heads=config.decoder_attention_heads,
        head_dim=config.d_model // config.encoder_attention_heads,
    )


def _t5(config: PretrainedConfig) -> PrefixShape:
    # T5's attention width is num_heads · d_kv, which need not equal d_model.
    return _encoder_decoder_shape(
        config,
        encoder_layers=config.num_layers,
        decoder_layers=config.num_decoder_layers or config.num_layers,
        encoder_heads=config.num_heads,
        decoder_heads=config.num_heads,
        head_dim=config.d_kv,
    )


def _bart_positions(module: nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """BART's learned positions ``(B, T)`` → embeddings ``(B, T, d_model)``; the table is
    offset by 2 (``BartLearnedPositionalEmbedding.offset``)."""
    weight, offset = module.weight, cast(int, module.offset)
    assert isinstance(weight, torch.Tensor)
    return nn.functional.embedding(positions + offset, weight)


DECODER_ONLY, ENCODER_DECODER = "decoder-only", "encoder-decoder"

# T5 has no position table: relative position buckets saturate at
# relative_attention_max_distance, so no hard limit exists. We use the length T5 was
# pretrained with (512 tokens per side; HF's T5 tokenizers say the same), unless the config
# names one.
T5_CONTEXT = 512


@dataclass(frozen=True)
class Family:
    """How one model family is prefix-tuned.

    Attributes:
        kind: ``decoder-only`` or ``encoder-decoder``.
        shape: config → :class:`PrefixShape`.
        encoder_self_attention: encoder-decoder only — path, under ``model.get_encoder()``,
            of encoder layer ``{i}``'s self-attention module (its forward takes
            ``past_key_values``; the encoder stack just never passes one).
        decoder_positions: path, under ``model.get_decoder()``, of a learned absolute
            position table whose output must follow per-row positions (BART); ``""`` when
            positions are relative to cache slots (T5) and need no help.
        position_embedding: for ``decoder_positions``: (module, positions ``(B, T)``) →
            embeddings ``(B, T, d_model)``.
        context: config → context length, when the config has no position-table size.
    """

    kind: str
    shape: Callable[[PretrainedConfig], PrefixShape]
    encoder_self_attention: str = ""
    decoder_positions: str = ""
    position_embedding: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    context: Callable[[PretrainedConfig], int] | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family(DECODER_ONLY, _grouped_query),
    "mistral": Family(DECODER_ONLY, _grouped_query),
    "qwen2": Family(DECODER_ONLY, _grouped_query),
    "gpt2": Family(DECODER_ONLY, _gpt2),
    "bart": Family(
        ENCODER_DECODER,
        _bart,
        encoder_self_attention="layers.{i}.self_attn",
        decoder_positions="embed_positions",
        position_embedding=_bart_positions,
    ),
    "t5": Family(
        ENCODER_DECODER,
        _t5,
        encoder_self_attention="block.{i}.layer.0.SelfAttention",
        context=lambda config: int(getattr(config, "n_positions", None) or T5_CONTEXT),
    ),
}


def family_of(config: PretrainedConfig) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise IncompatiblePrefixError(
            f"Model architecture {config.model_type!r} is not supported; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return family


def prefix_shape(config: PretrainedConfig) -> PrefixShape:
    return family_of(config).shape(config)


def is_encoder_decoder(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def model_class(
    config: PretrainedConfig,
) -> type[AutoModelForCausalLM] | type[AutoModelForSeq2SeqLM]:
    """The transformers auto class that builds a model with a language-modelling head for
    ``config``: sequence-to-sequence for encoder-decoder configs, causal otherwise."""
    return AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM


def max_positions(config: PretrainedConfig) -> int:
    """The model's context length.

    Decoder-only: prefix + input + output must fit in it. Encoder-decoder: each side must —
    the encoder's prefix + input, and the decoder's prefix + output (see
    :func:`context_problem`). T5 has relative positions and no table: see ``T5_CONTEXT``."""
    family = FAMILIES.get(config.model_type)
    if family is not None and family.context is not None:
        return family.context(config)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise IncompatiblePrefixError(f"Cannot tell the context length of {config.model_type!r}")


def context_problem(
    config: PretrainedConfig, *, prefix_length: int, input_tokens: int, output_tokens: int
) -> str | None:
    """Why ``input_tokens`` (prompt) and ``output_tokens`` (``max_new_tokens`` or a target)
    behind a prefix of ``prefix_length`` do not fit the context, or ``None`` when they do.

    Decoder-only: one sequence ``prefix + input + output``. Encoder-decoder: the encoder
    holds ``prefix + input``, the decoder ``prefix + output`` (the decoder's real tokens sit
    at positions ``P …``, as in decoder-only models); each must fit the context."""
    context = max_positions(config)
    if not is_encoder_decoder(config):
        needed = prefix_length + input_tokens + output_tokens
        if needed > context:
            return (
                f"{input_tokens} tokens + prefix {prefix_length} + max_new_tokens "
                f"{output_tokens} = {needed} > context {context}"
            )
        return None
    if prefix_length + input_tokens > context:
        return (
            f"encoder side: prefix {prefix_length} + {input_tokens} tokens = "
            f"{prefix_length + input_tokens} > context {context}"
        )
    if prefix_length + output_tokens > context:
        return (
            f"decoder side: prefix {prefix_length} + max_new_tokens {output_tokens} = "
            f"{prefix_length + output_tokens} > context {context}"
        )
    return None


def decoder_start_id(config: PretrainedConfig) -> int | None:
    """The token an encoder-decoder model's decoder starts from; ``None`` for decoder-only."""
    if not is_encoder_decoder(config):
        return None
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise IncompatiblePrefixError(
            f"{config.model_type}: the config has no decoder_start_token_id"
        )
    return int(start)
