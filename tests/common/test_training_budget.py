"""The automatic training budget: the rule itself, and train_prefix following it."""

import pytest

from common.data import Example
from common.training import train_prefix
from common.training_budget import (
    MAX_STEPS,
    MIN_STEPS,
    automatic_validation_size,
    automatic_validation_split,
    plan_budget,
)
from common.training_config import TrainingConfig


def test_tiny_datasets_get_the_floor_large_ones_the_ceiling():
    # 20 examples at batch 8: 3 steps an epoch; 5 epochs would be 15 steps, the floor is 40.
    tiny = plan_budget(20, 8, epochs=None, has_validation=False)
    assert (tiny.total_steps, tiny.evaluate_every, tiny.patience) == (MIN_STEPS, None, None)
    middle = plan_budget(400, 8, epochs=None, has_validation=False)
    assert middle.total_steps == 5 * 50 and middle.automatic
    huge = plan_budget(1_000_000, 8, epochs=None, has_validation=True)
    assert huge.total_steps == MAX_STEPS


def test_with_validation_the_budget_is_checked_often():
    budget = plan_budget(200, 8, epochs=None, has_validation=True)
    assert budget.total_steps == 5 * 25  # the same schedule as without validation
    assert budget.evaluate_every == 8  # ceil(125 / 16): 16 validations, not 5 epochs' worth
    assert budget.patience == 3
    assert plan_budget(200, 8, epochs=None, has_validation=True, patience=5).patience == 5


def test_given_epochs_are_obeyed_exactly():
    budget = plan_budget(20, 8, epochs=2, has_validation=True, patience=None)
    assert (budget.total_steps, budget.evaluate_every, budget.patience) == (6, None, None)
    assert not budget.automatic


@pytest.mark.parametrize(
    "examples, held_out", [(10, 0), (39, 0), (40, 6), (100, 15), (1000, 150), (5000, 200)]
)
def test_validation_is_held_out_once_there_are_enough_examples(examples, held_out):
    assert automatic_validation_size(examples) == held_out


def test_the_automatic_split_is_seeded_and_disjoint():
    examples = list(range(100))
    train, validation = automatic_validation_split(examples, seed=3)
    assert validation is not None and len(validation) == 15 and len(train) == 85
    assert sorted(train + validation) == examples
    assert automatic_validation_split(examples, seed=3) == (train, validation)
    assert automatic_validation_split(examples, seed=4) != (train, validation)
    assert automatic_validation_split(examples[:20], seed=3) == (examples[:20], None)


TASK = [Example(w, o) for w, o in [("alpha", "red green"), ("beta", "one two"), ("gamma", "cat")]]
FAST = dict(prefix_length=3, mid_dim=16, batch_size=8, learning_rate=1e-2)


def test_train_prefix_without_epochs_trains_the_automatic_budget(tiny_llama):
    config = TrainingConfig(**FAST)
    assert config.epochs is None  # automatic is the default
    result = train_prefix(tiny_llama, TASK * 3, config)  # 9 examples: 2 steps an epoch
    assert result.prefix.metrics["steps"] == result.prefix.metrics["planned_steps"] == MIN_STEPS
    assert result.prefix.metrics["automatic_budget"] is True
    assert [p.step for p in result.history] == list(range(1, MIN_STEPS + 1))
    assert all(p.total_steps == MIN_STEPS for p in result.history)


def test_automatic_budget_validates_often_stops_early_and_keeps_the_best(tiny_llama):
    # Validation outputs use words training never outputs: the better the prefix learns the
    # training outputs, the worse validation gets, so early stopping must end the run.
    config = TrainingConfig(**{**FAST, "learning_rate": 3e-2})
    validation = [Example("alpha", "hello world fish"), Example("beta", "bird dog say")]
    result = train_prefix(tiny_llama, TASK * 3, config, validation=validation)
    metrics = result.prefix.metrics
    checks = [(p.step, p.validation_loss) for p in result.history if p.validation_loss is not None]
    assert [step for step, _ in checks] == [3 * i for i in range(1, len(checks) + 1)]  # every 3
    best_step, best_loss = min(checks, key=lambda c: c[1])
    assert metrics["validation_loss"] == best_loss and metrics["best_step"] == best_step
    assert metrics["early_stopped"] is True and metrics["steps"] < metrics["planned_steps"]
    assert len(checks) - [s for s, _ in checks].index(best_step) - 1 == 3  # patience 3
