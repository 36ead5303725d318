import pytest
import torch

from common.architectures import PrefixShape, prefix_shape
from common.errors import InvalidInputError
from common.kv_cache import cache_key_values, prefix_cache
from common.prefix_encoder import PrefixEncoder
from common.prefix_init import build_prefix_encoder, text_key_values


def test_shapes_follow_key_value_heads_not_attention_heads(tiny_llama):
    shape = prefix_shape(tiny_llama.model.config)
    # The tiny Llama has 4 query heads sharing 2 key/value heads (grouped-query attention).
    assert shape == PrefixShape(layers=2, kv_heads=2, head_dim=16)
    encoder = PrefixEncoder(shape, 5, mid_dim=32)
    assert encoder().shape == (2, 2, 2, 5, 16)
    assert encoder.mlp[2].out_features == 2 * 2 * 2 * 16


def test_materialize_equals_forward_and_is_detached():
    encoder = PrefixEncoder(PrefixShape(3, 2, 4), 6, mid_dim=16)
    materialized = encoder.materialize()
    assert torch.equal(materialized, encoder().detach())
    assert not materialized.requires_grad and materialized.is_contiguous()


@pytest.mark.parametrize("length", [0, -3])
def test_prefix_length_must_be_positive(length):
    with pytest.raises(InvalidInputError, match="prefix length must be at least 1"):
        PrefixEncoder(PrefixShape(1, 1, 4), length)


def test_text_init_without_mlp_equals_the_models_own_key_values(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    text = "table to text :"
    encoder = build_prefix_encoder(
        model, tokenizer, init=f"text:{text}", prefix_length=99, mid_dim=32, reparameterize=False
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert encoder.prefix_length == len(ids) == 4  # length follows the text, not the flag
    cache = prefix_cache(None, model.config)
    with torch.no_grad():
        model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
    expected = cache_key_values(cache)[:, :, 0]  # (layers, 2, kv_heads, L, hs)
    assert torch.equal(encoder.materialize(), expected)


def test_text_init_with_mlp_fits_the_models_key_values(tiny_llama):
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    torch.manual_seed(0)
    encoder = build_prefix_encoder(
        model,
        tokenizer,
        init="text:table to text :",
        prefix_length=10,
        mid_dim=64,
        reparameterize=True,
        fit_steps=400,
    )
    target = text_key_values(model, tokenizer, "table to text :")
    error = torch.nn.functional.mse_loss(encoder.materialize(), target)
    assert error < 0.02 * target.pow(2).mean()


def test_unknown_init_is_refused(tiny_llama):
    with pytest.raises(InvalidInputError, match="--init must be 'random' or 'text:WORDS'"):
        build_prefix_encoder(
            tiny_llama.model,
            tiny_llama.tokenizer,
            init="zeros",
            prefix_length=2,
            mid_dim=8,
            reparameterize=True,
        )


def test_materialize_is_a_snapshot_even_without_reparameterization():
    # The best validation epoch is kept as materialize(); it must not move with training.
    encoder = PrefixEncoder(PrefixShape(2, 1, 4), 3, reparameterize=False)
    snapshot = encoder.materialize()
    with torch.no_grad():
        encoder.key_values.add_(1.0)
    assert not torch.equal(snapshot, encoder.materialize())
