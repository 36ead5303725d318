"""How long to train when the caller does not say: the automatic training budget.

``TrainingConfig.epochs = None`` (the default) means automatic; ``prefixd train-local`` and
training jobs both call :func:`plan_budget` (through :func:`common.training.train_prefix`)
and :func:`automatic_validation_split`, so they follow the same rule:

1. **Validation.** A dataset of at least ``VALIDATION_FROM`` (40) examples, given no
   validation set, holds out ``VALIDATION_FRACTION`` (15 %) of them — at least
   ``MIN_VALIDATION`` (6), at most ``MAX_VALIDATION`` (200) — by a seeded shuffle. Smaller
   datasets train on every example.
2. **Steps.** ``steps = clamp(AUTOMATIC_EPOCHS × ceil(n_train / batch_size), MIN_STEPS,
   MAX_STEPS)`` optimizer steps, ``AUTOMATIC_EPOCHS`` = 5 with or without a validation set.
   ``MIN_STEPS`` (40) is the floor for tiny datasets (20 examples at batch 8 would otherwise
   get 15 steps); ``MAX_STEPS`` (2000) the ceiling for large ones.
3. **Early stopping.** With a validation set the validation loss is computed every
   ``ceil(steps / EVALUATIONS)`` steps (``EVALUATIONS`` = 16, so small datasets are checked
   more often than once per epoch), training stops after ``DEFAULT_PATIENCE`` (3)
   evaluations without improvement, and the best prefix is the one returned.

Given ``epochs``, the budget is exactly ``epochs × ceil(n_train / batch_size)`` steps,
validated at the end of every epoch (the configured ``patience``, if any), as before.

Why these numbers: on E2E with the embedded model (docs/BENCHMARKS.md, "Training
fragility") the validation loss of a 10-position prefix bottoms out after about 5 epochs at
N = 50 and rises after; without a validation set 8 epochs cost BLEU. A larger budget with
early stopping did worse, not better: 10 epochs' worth, stopped on the validation loss, gave
52.7 BLEU at N = 100 (2 seeds) against 56.8 for 5 (docs/BENCHMARKS.md, "E2E at N = 100 and
200"): its best validation point came half way, with the learning rate not yet decayed. So
the schedule is always 5 epochs' worth, and validation picks its best point.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

VALIDATION_FROM = 40
VALIDATION_FRACTION = 0.15
MIN_VALIDATION = 6
MAX_VALIDATION = 200
AUTOMATIC_EPOCHS = 5
MIN_STEPS = 40
MAX_STEPS = 2000
EVALUATIONS = 16
DEFAULT_PATIENCE = 3
# TrainingConfig.batch_size when a job does not say (here so that estimating a job's steps,
# as every submission and the nightly planner do, needs no torch).
DEFAULT_BATCH_SIZE = 8
# ``validation_split_method: hash`` (workers/hyperparameters.py): an example is held out by a
# hash of its text, so it stays on the same side as the data grows (workers/quality_gate.py).
# Here, not there, so that the nightly planner can name it without importing torch.
HASH_SPLIT = "hash"

T = TypeVar("T")


@dataclass(frozen=True)
class Budget:
    total_steps: int
    steps_per_epoch: int
    evaluate_every: int | None  # steps between validations; None: at the end of each epoch
    patience: int | None  # validations without improvement before stopping; None: never
    automatic: bool


def automatic_validation_size(examples: int) -> int:
    """How many of ``examples`` the automatic rule holds out for validation (0: none)."""
    if examples < VALIDATION_FROM:
        return 0
    return min(MAX_VALIDATION, max(MIN_VALIDATION, round(VALIDATION_FRACTION * examples)))


def automatic_validation_split(examples: Sequence[T], seed: int) -> tuple[list[T], list[T] | None]:
    """``(train, validation)`` by the automatic rule: a seeded shuffle holds out
    :func:`automatic_validation_size` examples; ``validation`` is ``None`` when too few."""
    held_out = automatic_validation_size(len(examples))
    if held_out == 0:
        return list(examples), None
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled[held_out:], shuffled[:held_out]


def plan_budget(
    train_examples: int,
    batch_size: int,
    *,
    epochs: int | None,
    has_validation: bool,
    patience: int | None = None,
) -> Budget:
    """The optimizer steps and validation schedule for ``train_examples`` examples."""
    steps_per_epoch = max(1, math.ceil(train_examples / batch_size))
    if epochs is not None:
        return Budget(epochs * steps_per_epoch, steps_per_epoch, None, patience, automatic=False)
    total = min(MAX_STEPS, max(MIN_STEPS, AUTOMATIC_EPOCHS * steps_per_epoch))
    if not has_validation:
        return Budget(total, steps_per_epoch, None, None, automatic=True)
    return Budget(
        total,
        steps_per_epoch,
        evaluate_every=math.ceil(total / EVALUATIONS),
        patience=DEFAULT_PATIENCE if patience is None else patience,
        automatic=True,
    )
