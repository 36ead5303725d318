"""Bodies of OpenAI's fine-tuning routes (``/v1/fine_tuning/jobs``) as prefixd accepts them."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]


class FineTuningHyperparameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    n_epochs: Auto | Annotated[int, Field(ge=1, le=1000)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=1024)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    training_file: uuid.UUID
    validation_file: uuid.UUID | None = None
    hyperparameters: FineTuningHyperparameters = Field(default_factory=FineTuningHyperparameters)
    suffix: Annotated[str, Field(max_length=64)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
