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
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from services.api.deps import ContextDep, CurrentTenant
from services.api.errors import ApiError, stream_error_body, to_api_error
from services.api.routes.generate import (
    Admission,
    _run,
    _sample_seed,
    _sse,
    _usage,
    admit,
    resolve_prefix,
)
from services.api.schemas.generation import (
    ChatCompletionRequest,
    decoding_config,
    stop_sequences,
)
from services.inference.deployment import InferenceRequest, StreamEnd

router = APIRouter(prefix="/v1", tags=["generate"])


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
    prefix = await context.run_blocking(resolve_prefix, context, tenant.id, body.model)
    checker = await context.run_blocking(context.example_checker)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = await context.run_blocking(checker.chat_prompt, messages)
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": f"prefix-{prefix.id}",
    }

    def request(seed: int | None) -> InferenceRequest:
        decoding = decoding_config(
            max_tokens,
            body.temperature,
            body.top_p,
            1,
            seed,
            stop=stop_sequences(body.stop),
            **body.penalties(),
        )
        return prefix.request([prompt], decoding, chat=True)

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
