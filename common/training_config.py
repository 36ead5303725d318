"""What a prefix-tuning run is asked to do: :class:`TrainingConfig`, checked by
:meth:`TrainingConfig.validate`.

A module of its own, without torch, so that what only reads or checks a job's settings (the
scheduler, the API's routes, :mod:`common.hyperparameters`) does not import the training
loop (:mod:`common.training`) and with it torch and transformers: seconds of CPU in every
process that starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.errors import InvalidInputError
from common.training_budget import DEFAULT_BATCH_SIZE


@dataclass
class TrainingConfig:
    prefix_length: int = 10
    mid_dim: int = 512
    reparameterize: bool = True
    init: str = "random"  # or "text:WORDS"
    epochs: int | None = None  # None: automatic (common/training_budget.py)
    learning_rate: float = 5e-4
    batch_size: int = DEFAULT_BATCH_SIZE
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    loss_reduction: Literal["sequence_sum", "token_mean"] = "token_mean"
    # validations without improvement before stopping (None: never with a fixed epoch
    # count; the automatic budget's default otherwise)
    patience: int | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # of the stored prefix
    # the frozen model's compute on a CPU: "auto" is bfloat16 autocast where the CPU has
    # native bfloat16 (compute_precision), else float32. A GPU model already runs in its dtype.
    # float32 by default: bfloat16's loss drifts from float32's over a run's steps
    # (bench/train_throughput.py), and its effect on quality (E2E BLEU) is not measured yet.
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    # batches of similar lengths (less padding) for datasets of two grouping pools and more
    # (epoch_batches); False: plain shuffled batches whatever the size
    group_by_length: bool = True

    def validate(self) -> None:
        checks = [
            (
                self.prefix_length >= 1,
                f"prefix length must be at least 1, got {self.prefix_length}",
            ),
            (
                self.epochs is None or self.epochs >= 1,
                f"epochs must be at least 1 (or unset: automatic), got {self.epochs}",
            ),
            (
                self.patience is None or self.patience >= 1,
                f"patience must be at least 1, got {self.patience}",
            ),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"learning rate must be positive, got {self.learning_rate}"),
            (
                0 <= self.warmup_ratio < 1,
                f"warmup ratio must be in [0, 1), got {self.warmup_ratio}",
            ),
            (self.mid_dim >= 1, f"mid dim must be at least 1, got {self.mid_dim}"),
            (
                self.compute_dtype in ("auto", "float32", "bfloat16"),
                f"compute dtype must be auto, float32 or bfloat16, got {self.compute_dtype!r}",
            ),
            (
                self.loss_reduction in ("sequence_sum", "token_mean"),
                f"loss reduction must be sequence_sum or token_mean, got {self.loss_reduction!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInputError(message)
