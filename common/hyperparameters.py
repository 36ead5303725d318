"""A job's hyperparameters: the one schema the API validates at submission and the workers
parse from the stored JSON.

    spec = parse_hyperparameters({"epochs": 3, "learning_rate": 1e-3})
    spec.config                # a TrainingConfig (common/training_config.py)
    spec.validation_split      # None: automatic (common/training_budget.py)

:class:`Hyperparameters` declares every :class:`~common.training_config.TrainingConfig` field (with
its default, type and limits) plus how the job's examples are split and which base prefix it
trains from. Types are strict, as a JSON user would expect: ``"3"`` is not a number and
``true`` is not 1 (an int is still accepted where a float is expected); unknown names are
refused. The ranges that depend on the model (a prefix no longer than
``max_prefix_length``, an ``init`` text's token count) are the API's checks at submission.

``validation_split`` is the fraction of the job's examples held out for validation losses
and early stopping (0: none; unset: the automatic rule of :mod:`common.training_budget` when
``epochs`` is unset too, else none). ``validation_split_method`` is ``shuffle`` (a seeded
shuffle, the default) or ``hash`` (an example is held out when a hash of the seed and its
text falls under the fraction: the same example stays on the same side as a tenant's data
grows, which nightly jobs use so that successive versions are compared on examples neither
trained on).

Lower bounds (a positive learning rate, at least one epoch, ...) are checked once, by
``TrainingConfig.validate`` (the same checks ``prefixd train-local`` runs); the schema adds the
types and the upper limits a shared service needs.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from common.db.types import storable_text
from common.errors import InvalidInputError
from common.training_config import TrainingConfig

_DEFAULTS = TrainingConfig()

InitText = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(storable_text)]


class Hyperparameters(BaseModel):
    """Training hyperparameters of a job (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prefix_length: int = Field(
        default=_DEFAULTS.prefix_length,
        description="Virtual tokens per layer (at most the service's longest prefix); "
        "ignored with `text:` init, where the text's token count is the length.",
    )
    mid_dim: int = Field(
        default=_DEFAULTS.mid_dim,
        le=4096,
        description="Width of the reparameterization MLP used while training.",
    )
    reparameterize: bool = Field(
        default=_DEFAULTS.reparameterize,
        description="Train through the MLP (the paper's stable recipe); false trains the "
        "key/values directly.",
    )
    init: InitText = Field(
        default=_DEFAULTS.init,
        description="`random`, or `text:WORDS`: start from the frozen model's own "
        "activations for WORDS (the paper's better low-data init).",
    )
    epochs: int | None = Field(
        default=_DEFAULTS.epochs,
        le=1000,
        description="Passes over the data; unset: an automatic budget from the data size, "
        "with a validation split and early stopping (see docs/ARCHITECTURE.md).",
    )
    learning_rate: float = Field(default=_DEFAULTS.learning_rate, le=10, allow_inf_nan=False)
    batch_size: int = Field(default=_DEFAULTS.batch_size, le=1024)
    warmup_ratio: float = Field(default=_DEFAULTS.warmup_ratio, allow_inf_nan=False)
    weight_decay: float = Field(default=_DEFAULTS.weight_decay, ge=0, le=10, allow_inf_nan=False)
    max_grad_norm: float = Field(default=_DEFAULTS.max_grad_norm, gt=0, le=1e6, allow_inf_nan=False)
    seed: int = Field(default=_DEFAULTS.seed, ge=0, le=2**32 - 1)
    loss_reduction: Literal["sequence_sum", "token_mean"] = _DEFAULTS.loss_reduction
    patience: int | None = Field(
        default=_DEFAULTS.patience,
        le=1000,
        description="Validations without improvement before training stops (unset: never "
        "with a fixed epoch count, the automatic budget's default otherwise).",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default=_DEFAULTS.dtype, description="The stored prefix's dtype."
    )
    validation_split: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="Fraction of the examples held out for validation loss and early "
        "stopping (0: none; unset: automatic when `epochs` is unset, else none); not "
        "together with `validation_dataset_id`.",
    )
    validation_split_method: Literal["shuffle", "hash"] = "shuffle"
    base_prefix: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        default=None,
        description="Train from an operator's base prefix: its id, or `default` (the one the "
        "operator marked; stored as its id). Absent: no base.",
    )
    base_mode: Literal["warm_start", "stack"] | None = Field(
        default=None,
        description="With `base_prefix`: `warm_start` (start from the base's key/values; the "
        "result stands alone; the default) or `stack` (the base stays frozen in front of the "
        "tenant's own part, at training and at serving).",
    )

    def training_config(self) -> TrainingConfig:
        """The :class:`TrainingConfig` part; raises :class:`InvalidInputError` when the
        training code's own checks refuse it."""
        names = {f.name for f in dataclasses.fields(TrainingConfig)}
        config = TrainingConfig(**{k: v for k, v in self.model_dump().items() if k in names})
        config.validate()
        return config


@dataclasses.dataclass(frozen=True)
class JobTrainingSpec:
    config: TrainingConfig
    validation_split: float | None = None  # None: automatic (common/training_budget.py)
    validation_split_method: str = "shuffle"
    base_prefix: str | None = None
    base_mode: str | None = None


def describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "hyperparameters"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown hyperparameter {where!r}")
        else:
            parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def known_hyperparameters() -> list[str]:
    return sorted(Hyperparameters.model_fields)


def check_base_fields(params: Hyperparameters) -> None:
    if (params.base_prefix is None) != (params.base_mode is None):
        raise InvalidInputError(
            "invalid hyperparameters: base_prefix and base_mode go together (base_mode is "
            "warm_start or stack)"
        )


def parse_hyperparameters(raw: Any) -> JobTrainingSpec:
    """Validate a job's stored hyperparameters; raise :class:`InvalidInputError` naming each
    problem (and, for an unknown name, the known ones): a user error, so the job fails at
    once and is not retried."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidInputError(
            f"invalid hyperparameters: expected a JSON object, got {type(raw).__name__}"
        )
    try:
        params = Hyperparameters.model_validate(raw)
    except ValidationError as error:
        message = f"invalid hyperparameters: {describe_validation_error(error)}"
        if any(item["type"] == "extra_forbidden" for item in error.errors()):
            message += f" (known: {', '.join(known_hyperparameters())})"
        raise InvalidInputError(message) from None
    check_base_fields(params)
    try:
        config = params.training_config()
    except InvalidInputError as error:
        raise InvalidInputError(f"invalid hyperparameters: {error}") from None
    return JobTrainingSpec(
        config,
        validation_split=params.validation_split,
        validation_split_method=params.validation_split_method,
        base_prefix=params.base_prefix,
        base_mode=params.base_mode,
    )
