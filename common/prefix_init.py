"""How a prefix starts: random, or from the activations of real words.

The paper's better low-data initialization runs the frozen model over a short text (such as
the task's name, ``table-to-text:``) and starts the prefix from the keys and values the
model itself computes for it; the prefix length becomes the text's token count. With the
reparameterization MLP kept, the MLP is first fitted so that its output equals those
key/values (:meth:`PrefixEncoder.fit_to`); without it, the prefix is set to them directly.
Encoder-decoder models take the text's keys/values of all three sub-prefixes
(:func:`common.encoder_decoder.encoder_decoder_text_key_values`).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common import encoder_decoder
from common.architectures import is_encoder_decoder, prefix_shape
from common.errors import InvalidInputError
from common.kv_cache import cache_key_values, prefix_cache
from common.prefix_encoder import PrefixEncoder

TEXT_INIT = "text:"


@torch.no_grad()
def text_key_values(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str
) -> torch.Tensor:
    """The frozen model's own keys/values for ``text`` at positions ``0 … L-1``:
    ``(layers, 2, kv_heads, L, head_dim)``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InvalidInputError(f"--init text:{text!r} has no tokens")
    if is_encoder_decoder(model.config):
        return encoder_decoder.encoder_decoder_text_key_values(
            model, ids
        )  # (layers, 2, kv_heads, L, hs)
    cache = prefix_cache(None, model.config)
    model(torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True)
    return cache_key_values(cache)[:, :, 0].contiguous()  # (layers, 2, kv_heads, L, hs)


def build_prefix_encoder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    init: str,
    prefix_length: int,
    mid_dim: int,
    reparameterize: bool,
    fit_steps: int = 300,
) -> PrefixEncoder:
    """A :class:`PrefixEncoder` initialized as ``init`` says: ``random`` or ``text:WORDS``."""
    shape = prefix_shape(model.config)
    if init == "random":
        return PrefixEncoder(
            shape, prefix_length, mid_dim=mid_dim, reparameterize=reparameterize
        ).to(model.device)
    if init.startswith(TEXT_INIT):
        target = text_key_values(model, tokenizer, init.removeprefix(TEXT_INIT))
        encoder = PrefixEncoder(
            shape, target.shape[3], mid_dim=mid_dim, reparameterize=reparameterize
        ).to(model.device)
        encoder.fit_to(target, steps=fit_steps)
        return encoder
    raise InvalidInputError(f"--init must be 'random' or 'text:WORDS', got {init!r}")
