"""Bodies of the inference routes: ``/v1/generate``, OpenAI's ``/v1/completions`` and
``/v1/chat/completions``, and how their decoding fields become a ``DecodingConfig``."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.generation import MAX_PENALTY, MAX_SEED, DecodingConfig
from common.stop_sequences import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from services.api.errors import ApiError

MAX_INPUTS = 64


DEFAULT_MAX_NEW_TOKENS = 64


StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


# OpenAI's ``stop``: one string or up to 4; the row ends when its text contains one.
StopField = Annotated[
    StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None,
    Field(description=f"up to {MAX_STOP_SEQUENCES} sequences that end the output (not returned)"),
]


class Penalties(BaseModel):
    """The repetition penalties every generation route takes, with OpenAI's names and range."""

    presence_penalty: float = Field(
        default=0.0,
        ge=-MAX_PENALTY,
        le=MAX_PENALTY,
        description="subtracted from the score of every token the output already holds; 0: off",
    )
    frequency_penalty: float = Field(
        default=0.0,
        ge=-MAX_PENALTY,
        le=MAX_PENALTY,
        description="times the number of times a token is in the output so far, subtracted "
        "from its score; 0: off",
    )

    def penalties(self) -> dict[str, float]:
        return {
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerateRequest(Penalties):
    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(default=None, min_length=1, max_length=100_000)
    inputs: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=100_000)]],
            Field(min_length=1, max_length=MAX_INPUTS),
        ]
        | None
    ) = None
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description=f"default: {DEFAULT_MAX_NEW_TOKENS}, or the server's limit if lower",
    )
    temperature: float | None = Field(default=None, ge=0, le=10, description="0 or absent: greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    num_beams: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="absent: fresh randomness per request"
    )
    stop: StopField = None
    stream: bool = False

    @model_validator(mode="after")
    def one_of_input_or_inputs(self) -> GenerateRequest:
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of 'input' or 'inputs'")
        if self.stream and self.inputs is not None and len(self.inputs) > 1:
            raise ValueError("stream works with a single input")
        return self

    def texts(self) -> list[str]:
        return [self.input] if self.input is not None else list(self.inputs or [])

    def decoding(self, *, limit: int) -> DecodingConfig:
        """``limit``: the server's ``max_new_tokens_limit``, which an absent ``max_new_tokens``
        never exceeds (an explicit one over it is refused by the inference server)."""
        wanted = self.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, limit)
        return decoding_config(
            wanted,
            self.temperature,
            self.top_p,
            self.num_beams,
            self.seed,
            stop=stop_sequences(self.stop),
            **self.penalties(),
        )


def decoding_config(
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    num_beams: int,
    seed: int | None,
    *,
    stop: tuple[str, ...] = (),
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> DecodingConfig:
    sample = (temperature or 0) > 0 or (top_p is not None and top_p < 1)
    if sample and num_beams > 1:
        raise ApiError(
            422, "invalid_request", "choose sampling (temperature/top_p) or num_beams > 1, not both"
        )
    return DecodingConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=sample,
        temperature=temperature if temperature else 1.0,
        top_p=top_p if top_p is not None else 1.0,
        seed=seed,
        stop=stop,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    outputs: list[str]
    # Per output: "stop" (EOS or a stop sequence) or "length" (max_new_tokens reached).
    finish_reasons: list[str]
    prefix_id: uuid.UUID
    prefix_version: int
    usage: Usage


class CompletionRequest(Penalties):
    """The OpenAI completions request; ``model`` picks one of the caller's versions
    (``GET /v1/models``), the active one when absent or the base model's id."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
    max_tokens: int | None = Field(
        default=None, ge=1, description="default: 16 (OpenAI's), or the server's limit if lower"
    )
    temperature: float = Field(default=1.0, ge=0, le=10)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="sample i uses seed + i (mod 2**63); absent: fresh randomness per sample",
    )

    @model_validator(mode="after")
    def bounded(self) -> CompletionRequest:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if any(not p for p in prompts):
            raise ValueError("prompt must not be empty")
        if len(prompts) * self.n > MAX_INPUTS:
            raise ValueError(f"prompts × n must be at most {MAX_INPUTS}")
        if self.stream and (len(prompts) > 1 or self.n > 1):
            raise ValueError("stream works with one prompt and n = 1")
        return self


Text = Annotated[str, Field(max_length=100_000)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=64)]

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class ChatCompletionRequest(Penalties):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: StopField = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def consistent(self) -> ChatCompletionRequest:
        if self.stream and self.n > 1:
            raise ValueError("stream works with n = 1")
        if self.n > MAX_INPUTS:
            raise ValueError(f"n must be at most {MAX_INPUTS}")
        return self
