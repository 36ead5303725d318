"""Cross-check against Hugging Face PEFT: with the same prefix values, the model's logits
with our prefix equal PEFT's prefix-tuning logits."""

import torch
from peft import PrefixTuningConfig, get_peft_model

from common.architectures import prefix_shape
from common.data import Batch
from common.kv_cache import expand_prefix
from common.training import prefix_logits


def test_logits_equal_peft_prefix_tuning(tiny_model):
    model = tiny_model.model
    shape = prefix_shape(model.config)
    length = 5
    prefix = torch.randn(shape.tensor_shape(length), generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[10, 11, 12, 13], [14, 15, 16, 17]])
    mask = torch.ones_like(input_ids)
    ours = prefix_logits(model, expand_prefix(prefix, 2), Batch(input_ids, mask, input_ids))

    peft_model = get_peft_model(
        model,
        PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=length, prefix_projection=False
        ),
    )
    # PEFT keeps the prefix as an embedding (P, layers·2·kv_heads·hs) laid out as
    # (P, layers, 2, kv_heads, hs); ours is (layers, 2, kv_heads, P, hs).
    flat = prefix.permute(3, 0, 1, 2, 4).reshape(length, -1)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(flat)
        theirs = peft_model(input_ids=input_ids, attention_mask=mask).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert shape.kv_heads == getattr(
        model.config, "num_key_value_heads", model.config.num_attention_heads
    )
