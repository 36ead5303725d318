"""``POST /v1/chat/completions`` in OpenAI's shape, on the calling tenant's active prefix.

The messages become one prompt with the base model's chat template
(``common/chat_format.py``; a plain ``role: content`` format for a model without one), which
then goes the way of ``/v1/completions``: ``stop`` sequences end the row in the decode loop
(``common/stop_sequences.py``). Differences from OpenAI (docs/API.md): ``model``
picks one of the caller's versions (``GET /v1/models``), the active one when absent; no
tools, logprobs or images.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from common.generation import MAX_SEED
from services.api.deps import ContextDep, CurrentTenant
from services.api.errors import ApiError, stream_error_body, to_api_error
from services.api.routes.generate import (
    MAX_INPUTS,
    Admission,
    StopField,
    StreamOptions,
    _run,
    _sample_seed,
    _sse,
    _usage,
    admit,
    decoding_config,
    resolve_prefix,
    stop_sequences,
)
from services.inference.deployment import InferenceRequest, StreamEnd

router = APIRouter(prefix="/v1", tags=["generate"])

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


class ChatCompletionRequest(BaseModel):
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


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, tenant: CurrentTenant, context: ContextDep
) -> Any:
    """OpenAI-compatible chat completions; the tenant is chosen by its API key, the version
    by ``model``."""
    limit = context.settings.max_new_tokens_limit
    max_tokens = body.max_completion_tokens or body.max_tokens or limit
    admission = admit(context, tenant.id, body.n * max_tokens, stream=body.stream)
    try:
        return await _chat(body, max_tokens, tenant, context, admission)
    finally:
        admission.end_of_handler()


async def _chat(
    body: ChatCompletionRequest,
    max_tokens: int,
    tenant: Any,
    context: Any,
    admission: Admission,
) -> Any:
    prefix = await run_in_threadpool(resolve_prefix, context, tenant.id, body.model)
    checker = await run_in_threadpool(context.example_checker)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = await run_in_threadpool(checker.chat_prompt, messages)
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": f"prefix-{prefix.id}",
    }

    def request(seed: int | None) -> InferenceRequest:
        decoding = decoding_config(
            max_tokens, body.temperature, body.top_p, 1, seed, stop=stop_sequences(body.stop)
        )
        return prefix.request([prompt], decoding)

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _stream(context, request(body.seed), head, include_usage, admission)

    # n choices: the same prompt with n seeds, decoded concurrently (one batch).
    seeds = [_sample_seed(body.seed, i) for i in range(body.n)]
    results = await asyncio.gather(*(_run(context, request(seed)) for seed in seeds))
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": result.outputs[0]},
            "logprobs": None,
            "finish_reason": result.finish_reasons[0],
        }
        for index, result in enumerate(results)
    ]
    prompt_tokens = results[0].prompt_tokens
    completion_tokens = sum(r.completion_tokens for r in results)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage}


def _stream(
    context: Any,
    request: InferenceRequest,
    head: dict[str, Any],
    include_usage: bool,
    admission: Admission,
) -> StreamingResponse:
    chunk = {**head, "object": "chat.completion.chunk"}

    def delta(payload: dict[str, Any], finish: str | None = None) -> str:
        return _sse({**chunk, "choices": [{"index": 0, "delta": payload, "finish_reason": finish}]})

    async def events() -> AsyncIterator[str]:
        yield delta({"role": "assistant", "content": ""})
        try:
            async for item in context.inference.options(stream=True).stream.remote(request):
                if isinstance(item, StreamEnd):
                    yield delta({}, item.finish_reason)
                    if include_usage:
                        yield _sse({**chunk, "choices": [], "usage": _usage(item)})
                else:
                    yield delta({"content": item})
        except Exception as error:
            mapped = to_api_error(error) or ApiError(500, "internal", "generation failed")
            yield _sse(stream_error_body(mapped, openai=True))
        yield _sse("[DONE]")

    return admission.streaming_response(events())
