"""Base prefixes in the core: warm start, stacking, the file fields and their checks."""

import pytest
import torch

from common.architectures import prefix_shape
from common.base_prefix import (
    check_base,
    inference_prefix,
    key_values_fingerprint,
    stack_prefixes,
)
from common.data import Example, encode_examples
from common.errors import IncompatiblePrefixError, InvalidInputError
from common.generation import DecodingConfig, generate_texts
from common.prefix_file import Prefix, prefix_from_bytes, prefix_to_bytes
from common.training import evaluate_loss, train_prefix
from common.training_config import TrainingConfig

TASK = [
    Example("alpha", "red green blue"),
    Example("beta", "one two three"),
    Example("gamma", "cat dog"),
    Example("delta", "hello world"),
]
FAST = dict(prefix_length=3, mid_dim=32, epochs=4, batch_size=8, learning_rate=1e-2)


def random_base(loaded, length: int = 5, seed: int = 7) -> torch.Tensor:
    shape = prefix_shape(loaded.model.config).tensor_shape(length)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def loss_of(loaded, key_values: torch.Tensor, examples) -> float:
    encoded = encode_examples(loaded.tokenizer, examples, max_tokens=100)
    return evaluate_loss(loaded.model, key_values, encoded, batch_size=8, pad_id=0)


def test_stack_prefixes_concatenates_on_the_prefix_axis():
    base, tenant = torch.randn(2, 2, 3, 4, 8), torch.randn(2, 2, 3, 5, 8)
    stacked = stack_prefixes(base, tenant)
    assert stacked.shape == (2, 2, 3, 9, 8)
    assert torch.equal(stacked[:, :, :, :4], base) and torch.equal(stacked[:, :, :, 4:], tenant)
    assert stack_prefixes(base.half(), tenant).dtype == torch.float32  # the tenant's dtype


@pytest.mark.parametrize(
    "base, tenant, message",
    [
        (
            torch.randn(2, 2, 3, 4, 8),
            torch.randn(2, 2, 2, 5, 8),
            r"expected \(2, 2, 2, 8\).*got \(2, 2, 3, 8\)",
        ),
        (
            torch.randn(3, 2, 3, 4, 8),
            torch.randn(2, 2, 3, 5, 8),
            r"expected \(2, 2, 3, 8\).*got \(3, 2, 3, 8\)",
        ),
        (
            torch.randn(2, 3, 4, 8),
            torch.randn(2, 2, 3, 5, 8),
            r"\(layers, 2, kv_heads, P, head_dim\)",
        ),
    ],
)
def test_stack_prefixes_refuses_mismatched_shapes(base, tenant, message):
    with pytest.raises(IncompatiblePrefixError, match=message):
        stack_prefixes(base, tenant)


def test_fingerprint_follows_values_dtype_and_shape():
    tensor = torch.randn(2, 2, 1, 3, 4)
    assert key_values_fingerprint(tensor) == key_values_fingerprint(tensor.clone())
    assert key_values_fingerprint(tensor) != key_values_fingerprint(tensor + 1e-6)
    assert key_values_fingerprint(tensor) != key_values_fingerprint(tensor.half())
    assert key_values_fingerprint(tensor) != key_values_fingerprint(tensor.reshape(2, 2, 1, 4, 3))
    assert len(key_values_fingerprint(tensor.bfloat16())) == 64


def test_prefix_file_records_its_base_and_old_files_load():
    tensor = torch.randn(2, 2, 1, 3, 4)
    with_base = Prefix(
        tensor,
        "model-fp",
        "llama",
        base_prefix_id="base-1",
        base_fingerprint="ab" * 32,
        base_mode="stack",
    )
    loaded = prefix_from_bytes(prefix_to_bytes(with_base))
    assert (loaded.base_prefix_id, loaded.base_fingerprint, loaded.base_mode) == (
        "base-1",
        "ab" * 32,
        "stack",
    )
    plain = prefix_from_bytes(prefix_to_bytes(Prefix(tensor, "model-fp", "llama")))
    assert (plain.base_prefix_id, plain.base_fingerprint, plain.base_mode) == (None, None, None)


def test_prefix_file_refuses_a_bad_base_mode():
    tensor = torch.randn(2, 2, 1, 3, 4)
    with pytest.raises(IncompatiblePrefixError, match="base mode must be one of"):
        prefix_to_bytes(Prefix(tensor, "fp", "llama", base_mode="glue"))
    # A file edited by hand: the metadata is checked on load too.
    data = prefix_to_bytes(Prefix(tensor, "fp", "llama", base_mode="stack", base_fingerprint="x"))
    forged = data.replace(b'"base_mode":"stack"', b'"base_mode":"stick"')
    assert forged != data
    with pytest.raises(IncompatiblePrefixError, match=r"invalid metadata \(base_mode 'stick'"):
        prefix_from_bytes(forged, source="forged.safetensors")


def test_check_base_and_inference_prefix_name_expected_and_got():
    base = Prefix(torch.randn(2, 2, 1, 4, 4), "fp", "llama")
    fingerprint = key_values_fingerprint(base.key_values)
    tenant = Prefix(
        torch.randn(2, 2, 1, 3, 4),
        "fp",
        "llama",
        base_prefix_id="base-1",
        base_fingerprint=fingerprint,
        base_mode="stack",
    )
    check_base(tenant, "base-1", fingerprint)
    with pytest.raises(
        IncompatiblePrefixError, match="depends on base prefix 'base-1', got 'base-2'"
    ):
        check_base(tenant, "base-2", fingerprint)
    with pytest.raises(IncompatiblePrefixError, match="has changed since"):
        check_base(tenant, "base-1", "0" * 64)
    with pytest.raises(IncompatiblePrefixError, match="not available"):
        inference_prefix(tenant, None, base_prefix_id="base-1")
    changed = Prefix(base.key_values + 1, "fp", "llama")
    with pytest.raises(IncompatiblePrefixError, match="has changed since"):
        inference_prefix(tenant, changed, base_prefix_id="base-1")
    full = inference_prefix(tenant, base, base_prefix_id="base-1")
    assert torch.equal(full.key_values, stack_prefixes(base.key_values, tenant.key_values))
    # A warm-started prefix stands alone: it is used as it is, base or not.
    warm = Prefix(tenant.key_values, "fp", "llama", base_prefix_id="b", base_mode="warm_start")
    assert inference_prefix(warm, None, base_prefix_id=None) is warm


@pytest.mark.parametrize("reparameterize", [True, False])
def test_warm_start_begins_exactly_at_the_base(tiny_model, reparameterize):
    base = random_base(tiny_model)
    # float32 compute: the comparison below is exact, and bfloat16 autocast ("auto" on a CPU
    # with native bfloat16) would round the training loss but not the float32 evaluation's
    config = TrainingConfig(
        **{**FAST, "epochs": 2, "reparameterize": reparameterize, "compute_dtype": "float32"}
    )
    result = train_prefix(
        tiny_model, TASK, config, base=base, base_mode="warm_start", base_prefix_id="base-1"
    )
    # One batch holds every example, so the first step's loss is the base's token-mean loss.
    assert result.history[0].loss == pytest.approx(loss_of(tiny_model, base, TASK), rel=1e-5)
    prefix = result.prefix
    assert prefix.prefix_length == base.shape[3]  # the base's length, not config's 3
    assert not torch.equal(prefix.key_values, base)  # and it trained from there
    assert prefix.base_mode == "warm_start" and prefix.base_prefix_id == "base-1"
    assert prefix.base_fingerprint == key_values_fingerprint(base)


def test_stacking_keeps_the_base_frozen_and_trains_only_the_tenant_part(tiny_model):
    base = random_base(tiny_model)
    kept = base.clone()
    config = TrainingConfig(**{**FAST, "epochs": 6})
    result = train_prefix(
        tiny_model,
        TASK * 2,
        config,
        validation=TASK,
        base=base,
        base_mode="stack",
        base_prefix_id="base-1",
    )
    assert torch.equal(base, kept)  # bit-identical
    prefix = result.prefix
    assert prefix.prefix_length == 3  # only the tenant's part is returned
    assert (prefix.base_mode, prefix.base_prefix_id) == ("stack", "base-1")
    assert result.history[-1].loss < result.history[0].loss
    # What training validated is what inference runs: the stacked tensor.
    full = inference_prefix(
        prefix,
        Prefix(base, tiny_model.fingerprint, tiny_model.architecture),
        base_prefix_id="base-1",
    )
    assert prefix.metrics["validation_loss"] == pytest.approx(
        loss_of(tiny_model, full.key_values, TASK), rel=1e-5
    )
    # The tenant part alone is not the trained model.
    assert loss_of(tiny_model, prefix.key_values, TASK) != pytest.approx(
        prefix.metrics["validation_loss"], rel=1e-3
    )


def test_stacking_learns_on_top_of_the_base(tiny_llama):
    base = random_base(tiny_llama)
    config = TrainingConfig(**{**FAST, "epochs": 40, "learning_rate": 3e-2, "mid_dim": 64})
    result = train_prefix(tiny_llama, TASK * 2, config, base=base, base_mode="stack")
    stacked = Prefix(
        stack_prefixes(base, result.prefix.key_values),
        tiny_llama.fingerprint,
        tiny_llama.architecture,
    )
    outputs = generate_texts(
        tiny_llama, [(stacked, e.input) for e in TASK], DecodingConfig(max_new_tokens=8)
    )
    assert outputs == [e.output for e in TASK]


def test_stacking_encoder_decoder_prefixes(tiny_seq2seq):
    base = random_base(tiny_seq2seq, length=2)
    result = train_prefix(
        tiny_seq2seq,
        TASK,
        TrainingConfig(**{**FAST, "epochs": 2}),
        validation=TASK,
        base=base,
        base_mode="stack",
    )
    assert result.prefix.prefix_length == 3
    full = stack_prefixes(base, result.prefix.key_values)
    encoded = encode_examples(tiny_seq2seq.tokenizer, TASK, max_tokens=100, encoder_decoder=True)
    assert result.prefix.metrics["validation_loss"] == pytest.approx(
        evaluate_loss(tiny_seq2seq.model, full, encoded, batch_size=8, pad_id=0), rel=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_mode": "stack"}, "a base mode needs a base prefix"),
        ({"base": "ok"}, "a base prefix needs a base mode"),
        ({"base": "ok", "base_mode": "glue"}, "base mode must be one of warm_start, stack"),
        (
            {"base": "wrong", "base_mode": "stack"},
            r"expected shape \(2, 2, 2, 5, 16\), got \(2, 2, 2, 5, 8\)",
        ),
        ({"base": "ok", "base_mode": "warm_start", "init": "text:red"}, "give one of them"),
        ({"base": "nan", "base_mode": "stack"}, "not finite"),
    ],
)
def test_bad_base_arguments_are_refused(tiny_llama, kwargs, message):
    kwargs = dict(kwargs)
    bases = {
        "ok": random_base(tiny_llama),
        "wrong": torch.randn(2, 2, 2, 5, 8),
        "nan": random_base(tiny_llama) * float("nan"),
    }
    if "base" in kwargs:
        kwargs["base"] = bases[kwargs["base"]]
    config = TrainingConfig(**{**FAST, "init": kwargs.pop("init", "random")})
    with pytest.raises(InvalidInputError, match=message):
        train_prefix(tiny_llama, TASK, config, **kwargs)
