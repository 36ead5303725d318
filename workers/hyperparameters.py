"""A job's hyperparameters (the JSON object stored with it) → a :class:`TrainingConfig`.

Every field of :class:`~common.training.TrainingConfig` may be given, with its type checked,
plus ``validation_split`` (the fraction of the job's examples held out for validation
losses and early stopping; 0 means none; unset, the automatic rule of
:mod:`common.training_budget` when ``epochs`` is unset too, else none) and ``validation_split_method``: ``shuffle`` (a
seeded shuffle, the default) or ``hash`` (an example is held out when a hash of the seed and
its text falls under the fraction: the same example stays on the same side as a tenant's
data grows, which nightly jobs use so that successive versions are compared on examples
neither trained on). Unknown names, wrong types and out-of-range values
raise :class:`InvalidInputError` with one readable message: a user error, so the job fails
at once and is not retried. The API can call :func:`parse_hyperparameters` at submission to
refuse a bad job before it is queued.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from common.errors import InvalidInputError
from common.training import TrainingConfig

EXTRA_FIELDS: dict[str, Any] = {
    "validation_split": (float | None, Field(default=None, ge=0.0, lt=1.0)),
    "validation_split_method": (Literal["shuffle", "hash"], Field(default="shuffle")),
    # The operator's base prefix the job trains from (its id; the API resolves "default"
    # to the id at submission) and how: see common/base_prefix.py. None: no base.
    "base_prefix": (str | None, Field(default=None, max_length=64)),
    "base_mode": (Literal["warm_start", "stack"] | None, Field(default=None)),
}


@dataclasses.dataclass(frozen=True)
class JobTrainingSpec:
    config: TrainingConfig
    validation_split: float | None = None  # None: automatic (common/training_budget.py)
    validation_split_method: str = "shuffle"
    base_prefix: str | None = None
    base_mode: str | None = None


@functools.cache
def _schema() -> type[BaseModel]:
    hints = typing.get_type_hints(TrainingConfig)
    fields: dict[str, Any] = {
        f.name: (hints[f.name], f.default) for f in dataclasses.fields(TrainingConfig)
    }
    # strict: "3" is not an int and true is not 1, as a JSON user would expect; an int is
    # still accepted where a float is expected.
    return create_model(  # type: ignore[call-overload,no-any-return]
        "Hyperparameters",
        __config__=ConfigDict(extra="forbid", strict=True),
        **fields,
        **EXTRA_FIELDS,
    )


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "hyperparameters"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown hyperparameter {where!r}")
        else:
            parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def known_hyperparameters() -> list[str]:
    return sorted(_schema().model_fields)


def parse_hyperparameters(raw: Any) -> JobTrainingSpec:
    """Validate a job's hyperparameters; raise :class:`InvalidInputError` naming each
    problem (and, for an unknown name, the known ones)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidInputError(
            f"invalid hyperparameters: expected a JSON object, got {type(raw).__name__}"
        )
    try:
        parsed = _schema().model_validate(raw)
    except ValidationError as error:
        message = f"invalid hyperparameters: {_describe(error)}"
        if any(item["type"] == "extra_forbidden" for item in error.errors()):
            message += f" (known: {', '.join(known_hyperparameters())})"
        raise InvalidInputError(message) from None
    values = parsed.model_dump()
    raw_split = values.pop("validation_split")
    validation_split = None if raw_split is None else float(raw_split)
    method = str(values.pop("validation_split_method"))
    base_prefix, base_mode = values.pop("base_prefix"), values.pop("base_mode")
    if (base_prefix is None) != (base_mode is None):
        raise InvalidInputError(
            "invalid hyperparameters: base_prefix and base_mode go together (base_mode is "
            "warm_start or stack)"
        )
    config = TrainingConfig(**values)
    try:
        config.validate()
    except InvalidInputError as error:
        raise InvalidInputError(f"invalid hyperparameters: {error}") from None
    return JobTrainingSpec(config, validation_split, method, base_prefix, base_mode)
