import pytest
import torch

from common.data import Example
from common.errors import InvalidInputError
from common.generation import DecodingConfig, generate_texts
from common.training import Progress, train_prefix
from common.training_config import TrainingConfig

# A small learnable task: each input word maps to its own output.
TASK = [
    Example("alpha", "red green blue"),
    Example("beta", "one two three"),
    Example("gamma", "cat dog"),
    Example("delta", "hello world"),
]
FAST = dict(
    prefix_length=6, mid_dim=64, epochs=40, batch_size=8, learning_rate=3e-2, warmup_ratio=0.05
)


def test_training_learns_the_task_and_leaves_the_base_model_untouched(tiny_model):
    before = {name: tensor.clone() for name, tensor in tiny_model.model.state_dict().items()}
    events: list[Progress] = []
    result = train_prefix(tiny_model, TASK * 2, TrainingConfig(**FAST), on_progress=events.append)

    assert [e.step for e in events] == list(range(1, 41))
    assert all(e.total_steps == 40 for e in events)
    assert events[-1].loss < 0.2 * events[0].loss
    assert all(e.tokens_per_second > 0 for e in events)
    outputs = generate_texts(
        tiny_model, [(result.prefix, e.input) for e in TASK], DecodingConfig(max_new_tokens=8)
    )
    assert outputs == [e.output for e in TASK]

    # Invariant 1: base weights bit-identical, and they never had gradients.
    after = tiny_model.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None and not p.requires_grad for p in tiny_model.model.parameters())


def test_artifact_holds_only_the_materialized_prefix(tiny_llama):
    result = train_prefix(tiny_llama, TASK, TrainingConfig(**{**FAST, "epochs": 1}))
    prefix = result.prefix
    assert prefix.key_values.shape == (2, 2, 2, 6, 16)
    assert not prefix.key_values.requires_grad
    assert prefix.base_model_fingerprint == tiny_llama.fingerprint
    assert prefix.hyperparameters["mid_dim"] == 64 and prefix.metrics["steps"] == 1


@pytest.mark.parametrize("reduction", ["sequence_sum", "token_mean"])
def test_both_loss_reductions_train(tiny_llama, reduction):
    config = TrainingConfig(
        **{**FAST, "epochs": 15, "loss_reduction": reduction, "learning_rate": 1e-2}
    )
    result = train_prefix(tiny_llama, TASK * 2, config)
    assert result.history[-1].loss < 0.5 * result.history[0].loss


def test_sequence_sum_is_the_token_mean_times_the_average_target_length(tiny_llama):
    # Same seed, one step, no update applied yet when the loss is computed.
    losses = {}
    for reduction in ("sequence_sum", "token_mean"):
        config = TrainingConfig(**{**FAST, "epochs": 1, "loss_reduction": reduction})
        losses[reduction] = train_prefix(tiny_llama, TASK, config).history[0].loss
    target_tokens = sum(len(e.output.split()) + 1 for e in TASK)
    assert losses["sequence_sum"] == pytest.approx(
        losses["token_mean"] * target_tokens / len(TASK), rel=1e-4
    )


def test_validation_and_early_stopping_keep_the_best_prefix(tiny_llama):
    config = TrainingConfig(
        **{**FAST, "epochs": 30, "patience": 2, "learning_rate": 0.5, "warmup_ratio": 0.0}
    )
    result = train_prefix(tiny_llama, TASK, config, validation=TASK)
    validation = [e.validation_loss for e in result.history if e.validation_loss is not None]
    assert len(validation) == len({e.epoch for e in result.history})
    assert result.prefix.metrics["validation_loss"] == pytest.approx(min(validation))


def test_same_seed_same_prefix(tiny_llama):
    config = TrainingConfig(**{**FAST, "epochs": 2})
    first = train_prefix(tiny_llama, TASK, config).prefix.key_values
    second = train_prefix(tiny_llama, TASK, config).prefix.key_values
    assert torch.equal(first, second)


def test_should_stop_ends_training_between_steps(tiny_llama):
    calls = iter(range(100))
    result = train_prefix(
        tiny_llama,
        TASK,
        TrainingConfig(**{**FAST, "batch_size": 1}),
        should_stop=lambda: next(calls) >= 3,
    )
    assert len(result.history) == 3
    assert result.prefix.metrics["stopped_early"] is True


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prefix_length", 0, "prefix length must be at least 1, got 0"),
        ("epochs", 0, "epochs must be at least 1"),
        ("batch_size", -1, "batch size must be at least 1"),
        ("learning_rate", 0.0, "learning rate must be positive"),
    ],
)
def test_bad_hyperparameters_are_refused(tiny_llama, field, value, message):
    with pytest.raises(InvalidInputError, match=message):
        train_prefix(tiny_llama, TASK, TrainingConfig(**{**FAST, field: value}))


def test_example_longer_than_context_minus_prefix_is_refused(tiny_llama):
    # The tiny model's context is 128 positions; with a 100-position prefix 28 remain.
    long_example = Example("alpha " * 30, "red")
    with pytest.raises(InvalidInputError, match="example 2 has 33 tokens; the limit is 28"):
        train_prefix(
            tiny_llama, [TASK[0], long_example], TrainingConfig(**{**FAST, "prefix_length": 100})
        )


@pytest.mark.parametrize("reduction", ["sequence_sum", "token_mean"])
def test_output_only_projection_gives_the_full_logits_loss(tiny_model, reduction):
    from common.data import collate, encode_examples
    from common.kv_cache import expand_prefix
    from common.training import output_loss, prefix_logits, prefix_output_loss

    examples = [Example("alpha beta gamma", "red"), Example("delta", "one two three four")]
    batch = collate(encode_examples(tiny_model.tokenizer, examples, max_tokens=64), pad_id=0)
    shape = tiny_model.model.config
    from common.architectures import prefix_shape

    prefix = torch.randn(prefix_shape(shape).tensor_shape(3), requires_grad=True)
    fast = prefix_output_loss(tiny_model.model, expand_prefix(prefix, 2), batch, reduction)
    full = output_loss(
        prefix_logits(tiny_model.model, expand_prefix(prefix, 2), batch), batch.labels, reduction
    )
    torch.testing.assert_close(fast, full)
    (grad_fast,) = torch.autograd.grad(fast, prefix)
    (grad_full,) = torch.autograd.grad(full, prefix)
    torch.testing.assert_close(grad_fast, grad_full)


def test_length_grouping_batches_every_example_once_with_less_padding():
    import random

    from common.training import length_grouped_batches, shuffled_batches

    lengths = [random.Random(i).randint(5, 90) for i in range(203)]
    grouped = length_grouped_batches(lengths, 8, random.Random(0))
    plain = shuffled_batches(len(lengths), 8, random.Random(0))
    assert sorted(i for batch in grouped for i in batch) == list(range(203))
    assert len(grouped) == len(plain) == 26
    assert sum(len(batch) < 8 for batch in grouped) == 1  # only the last pool's tail

    def padded_positions(batches):
        return sum(
            len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches
        )

    assert padded_positions(grouped) < 0.2 * padded_positions(plain)
    # a different epoch (the generator moved on) groups differently: rows still mix
    assert length_grouped_batches(lengths, 8, random.Random(1)) != grouped


def test_only_datasets_of_two_pools_and_more_are_grouped_by_length():
    """A dataset that fits in one pool would get the same batches every epoch: it is
    shuffled plainly; from two pools up the epoch is length-grouped."""
    import random

    from common.training import (
        GROUPING_MIN_POOLS,
        GROUPING_POOL_BATCHES,
        epoch_batches,
        length_grouped_batches,
        min_grouped_examples,
        shuffled_batches,
    )

    two_pools = GROUPING_MIN_POOLS * GROUPING_POOL_BATCHES * 8
    assert min_grouped_examples(8) == two_pools == 256
    for count, grouped in ((two_pools - 1, False), (two_pools, True), (40, False)):
        lengths = [random.Random(i).randint(5, 90) for i in range(count)]
        made = epoch_batches(lengths, 8, random.Random(3), group_by_length=True)
        if grouped:
            assert made == length_grouped_batches(lengths, 8, random.Random(3))
        else:
            assert made == shuffled_batches(count, 8, random.Random(3))
        assert epoch_batches(
            lengths, 8, random.Random(3), group_by_length=False
        ) == shuffled_batches(count, 8, random.Random(3))


def test_grouped_and_plain_batches_reach_the_same_loss(tiny_llama, monkeypatch):
    """Grouping reorders which rows share a batch, not what a row computes: on the same data
    both orders train to a loss within noise of each other."""
    monkeypatch.setattr("common.training.GROUPING_MIN_POOLS", 0)  # group even these 4 rows
    mixed = [*TASK, Example("epsilon zeta eta theta", "a b c d e f"), Example("iota", "z")]
    # One batch of every row, in another order: the first loss is the same number.
    first = {}
    for grouped in (True, False):
        config = TrainingConfig(
            **{**FAST, "epochs": 1, "group_by_length": grouped, "compute_dtype": "float32"}
        )
        first[grouped] = train_prefix(tiny_llama, mixed, config).history[0].loss
    assert first[True] == pytest.approx(first[False], rel=1e-5)
    final = {}
    for grouped in (True, False):
        config = TrainingConfig(
            **{**FAST, "epochs": 30, "batch_size": 2, "group_by_length": grouped}
        )
        final[grouped] = train_prefix(tiny_llama, mixed, config).history[-1].loss
    assert final[True] < 0.3 and final[False] < 0.3, final


def test_bfloat16_compute_trains_a_finite_prefix_that_loads(tiny_model, tmp_path):
    from common.prefix_file import load_prefix, save_prefix

    losses = {}
    for compute_dtype in ("float32", "bfloat16"):
        config = TrainingConfig(**{**FAST, "epochs": 1, "compute_dtype": compute_dtype})
        result = train_prefix(tiny_model, TASK, config)
        assert result.prefix.hyperparameters["compute_dtype"] == compute_dtype
        losses[compute_dtype] = result.history[0].loss  # same seed, before any update
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)

    config = TrainingConfig(**{**FAST, "epochs": 20, "compute_dtype": "bfloat16"})
    result = train_prefix(tiny_model, TASK * 2, config)
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in result.history)
    assert result.history[-1].loss < 0.5 * result.history[0].loss
    assert result.prefix.key_values.dtype == torch.float32  # the stored dtype, not compute's
    assert torch.isfinite(result.prefix.key_values).all()
    path = save_prefix(result.prefix, tmp_path / "bf16.safetensors")
    loaded = load_prefix(path, expected_fingerprint=tiny_model.fingerprint)
    assert torch.equal(loaded.key_values, result.prefix.key_values)


def test_auto_compute_dtype_is_bfloat16_only_on_a_native_bfloat16_cpu(tiny_llama):
    from common.training import cpu_has_native_bfloat16, resolved_compute_dtype

    expected = "bfloat16" if cpu_has_native_bfloat16() else "float32"
    assert resolved_compute_dtype(tiny_llama.model, "auto") == expected
    assert resolved_compute_dtype(tiny_llama.model, "float32") == "float32"
    with pytest.raises(InvalidInputError, match="compute dtype must be auto, float32 or bfloat16"):
        train_prefix(tiny_llama, TASK, TrainingConfig(**{**FAST, "compute_dtype": "fp8"}))
