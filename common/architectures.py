"""Model families prefix-tuning supports, and the shape of a prefix for each.

Family differences live in this one table (not in branches spread over the code): how to
read the number of layers, key/value heads and head size from a config. A prefix holds
``num_key_value_heads`` heads — not ``num_attention_heads`` — so grouped-query attention
models (Llama 2/3, SmolLM2, Mistral, Qwen2) get the smaller prefix they actually cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig

from common.errors import IncompatiblePrefixError


@dataclass(frozen=True)
class PrefixShape:
    """Dimensions of one prefix: a tensor ``(layers, 2, kv_heads, length, head_dim)``;
    index 0 of the second axis holds keys, index 1 values."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

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


@dataclass(frozen=True)
class Family:
    kind: str  # "decoder-only" (encoder-decoder families arrive with their own cache layout)
    shape: Callable[[PretrainedConfig], PrefixShape]


FAMILIES: dict[str, Family] = {
    "llama": Family("decoder-only", _grouped_query),
    "mistral": Family("decoder-only", _grouped_query),
    "qwen2": Family("decoder-only", _grouped_query),
    "gpt2": Family("decoder-only", _gpt2),
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


def max_positions(config: PretrainedConfig) -> int:
    """The model's context length: prefix positions plus input plus output must fit in it."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise IncompatiblePrefixError(f"Cannot tell the context length of {config.model_type!r}")
