"""``POST /v1/generate`` and the OpenAI-compatible ``POST /v1/completions``.

The tenant comes from its API key; its *active* prefix is resolved from the database on
every request, so a new version, a rollback or a deletion takes effect for the very next
request. The request then goes to the inference deployment, where it shares forward passes
with other tenants' requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlmodel import Session

from common.db import crud
from common.db.models import BasePrefix, PrefixVersion
from common.generation import MAX_SEED, DecodingConfig
from services.api.deps import (
    ContextDep,
    CurrentTenant,
    enforce_generate_rate,
    too_many_at_once,
)
from services.api.errors import ApiError, stream_error_body, to_api_error
from services.api.schemas.generation import (
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    Usage,
    decoding_config,
    stop_sequences,
)
from services.inference.deployment import InferenceRequest, InferenceResult, StreamEnd

router = APIRouter(prefix="/v1", tags=["generate"])


class Admission:
    """What an admitted request holds; released once, by the handler or (streams) by the
    stream when it ends."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release, self.released, self.streaming = release, False, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()

    def end_of_handler(self) -> None:
        if not self.streaming:
            self.release()

    def streaming_response(self, events: AsyncIterator[str]) -> StreamingResponse:
        """Server-sent ``events`` that hold this admission until the stream ends, fails or
        its client leaves (the handler's own end then releases nothing)."""
        self.streaming = True

        async def held() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            finally:
                self.release()

        return StreamingResponse(held(), media_type="text/event-stream")


def admit(context: Any, tenant_id: uuid.UUID, cost: int, *, stream: bool) -> Admission:
    """Cost-aware admission, before any work: the request's cost (inputs × beams or samples
    × new tokens) within ``max_request_cost`` (422), the tenant's rate limit charged by cost
    and its in-flight cost (and open streams) within their caps (429). Returns the release
    to call when the request ends."""
    settings = context.settings
    if cost > settings.max_request_cost:
        raise ApiError(
            422,
            "request_too_costly",
            f"this request costs {cost} (inputs × beams or n × new tokens); max_request_cost "
            f"is {settings.max_request_cost}",
            param="max_tokens",
        )
    enforce_generate_rate(tenant_id, context, cost)
    if stream and not context.open_streams.try_acquire(tenant_id):
        raise too_many_at_once(
            "open streams", "tenant_max_concurrent_streams", settings.tenant_max_concurrent_streams
        )
    if not context.inflight_cost.try_acquire(tenant_id, cost):
        if stream:
            context.open_streams.release(tenant_id)
        raise too_many_at_once(
            "generate requests (by cost)",
            "tenant_max_inflight_cost",
            settings.tenant_max_inflight_cost,
        )

    def release() -> None:
        context.inflight_cost.release(tenant_id, cost)
        if stream:
            context.open_streams.release(tenant_id)

    return Admission(release)


def _active_prefix(
    context: Any, session: Any, tenant_id: uuid.UUID, model: str | None = None
) -> ServedPrefix:
    """The version to serve: the tenant's active one, or the one an OpenAI-style ``model``
    names (``services/api/routes/models.py``)."""
    from services.api.routes.models import requested_version

    prefix = requested_version(context, session, tenant_id, model)
    if prefix is None:
        prefix = crud.get_active_prefix(session=session, tenant_id=tenant_id)
    if prefix is None:
        raise ApiError(
            409,
            "no_active_prefix",
            "this tenant has no trained prefix yet: submit a training job first",
        )
    if prefix.base_model_fingerprint != context.model_fingerprint:
        raise ApiError(409, "incompatible_prefix", "the prefix was trained for another base model")
    base = None
    if prefix.base_mode == crud.STACK and prefix.base_prefix_id is not None:
        base = crud.get_base_prefix(session=session, base_prefix_id=prefix.base_prefix_id)
        if base is None:
            raise ApiError(
                409,
                "base_prefix_missing",
                f"the active prefix (version {prefix.version}) is stacked on base prefix "
                f"{prefix.base_prefix_id}, which the operator deleted; it is not served "
                "without its base: activate another version or train a new one",
            )
    return ServedPrefix(prefix, base)


def resolve_prefix(context: Any, tenant_id: uuid.UUID, model: str | None = None) -> ServedPrefix:
    """:func:`_active_prefix` in a session of its own: the generate routes take no request
    session, so the lookup is their only trip to the thread pool (a hand-off per request)."""
    with Session(context.db) as session:
        return _active_prefix(context, session, tenant_id, model)


@dataclass(frozen=True)
class ServedPrefix:
    """The tenant's active version and, when it is stacked, its base prefix."""

    prefix: PrefixVersion
    base: BasePrefix | None

    @property
    def id(self) -> uuid.UUID:
        return self.prefix.id

    @property
    def version(self) -> int:
        return self.prefix.version

    def request(
        self, inputs: list[str], decoding: DecodingConfig, *, chat: bool = False
    ) -> InferenceRequest:
        return InferenceRequest(
            str(self.prefix.id),
            self.prefix.object_key,
            inputs,
            decoding,
            base_prefix_id=str(self.base.id) if self.base is not None else None,
            base_object_key=self.base.object_key if self.base is not None else None,
            chat=chat,
        )


async def _run(context: Any, request: InferenceRequest) -> InferenceResult:
    try:
        return await context.inference.generate.remote(request)
    except Exception as error:
        mapped = to_api_error(error)
        if mapped is None:
            raise
        raise mapped from None


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


def _usage(end: StreamEnd) -> dict[str, int]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "total_tokens": end.prompt_tokens + end.completion_tokens,
    }


def _stream(
    context: Any,
    request: InferenceRequest,
    head: dict[str, Any],
    shape: str,
    admission: Admission,
    *,
    include_usage: bool = False,
) -> StreamingResponse:
    """``shape`` "prefixd": ``{"delta"}`` events, then one with ``finish_reason`` and
    ``usage``; "openai": completion chunks, the last with ``finish_reason``, then (when
    asked) a usage chunk with no choices."""

    async def events() -> AsyncIterator[str]:
        handle = context.inference.options(stream=True)
        try:
            async for item in handle.stream.remote(request):
                if isinstance(item, StreamEnd):
                    if shape == "openai":
                        choice = {"text": "", "index": 0, "finish_reason": item.finish_reason}
                        yield _sse({**head, "choices": [choice]})
                        if include_usage:
                            yield _sse({**head, "choices": [], "usage": _usage(item)})
                    else:
                        yield _sse(
                            {
                                "delta": "",
                                "finish_reason": item.finish_reason,
                                "usage": _usage(item),
                                **head,
                            }
                        )
                elif shape == "openai":
                    yield _sse(
                        {**head, "choices": [{"text": item, "index": 0, "finish_reason": None}]}
                    )
                else:
                    yield _sse({"delta": item, **head})
        except Exception as error:
            mapped = to_api_error(error) or ApiError(500, "internal", "generation failed")
            yield _sse(stream_error_body(mapped, openai=shape == "openai"))
        yield _sse("[DONE]")

    return admission.streaming_response(events())


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={409: {"description": "no active prefix, or its base prefix was deleted"}},
)
async def generate(body: GenerateRequest, tenant: CurrentTenant, context: ContextDep) -> Any:
    """Generate with the calling tenant's active prefix."""
    decoding = body.decoding(limit=context.settings.max_new_tokens_limit)
    cost = len(body.texts()) * decoding.num_beams * decoding.max_new_tokens
    admission = admit(context, tenant.id, cost, stream=body.stream)
    try:
        prefix = await context.run_blocking(resolve_prefix, context, tenant.id)
        request = prefix.request(body.texts(), decoding)
        if body.stream:
            head = {"prefix_id": str(prefix.id)}
            return _stream(context, request, head, shape="prefixd", admission=admission)
        result = await _run(context, request)
    finally:
        admission.end_of_handler()
    return GenerateResponse(
        outputs=result.outputs,
        finish_reasons=result.finish_reasons,
        prefix_id=prefix.id,
        prefix_version=prefix.version,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
    )


@router.post("/completions")
async def completions(body: CompletionRequest, tenant: CurrentTenant, context: ContextDep) -> Any:
    """OpenAI-compatible completions; the tenant is chosen by its API key, the version by
    ``model`` (``GET /v1/models``; absent: the active one)."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = body.max_tokens or min(16, context.settings.max_new_tokens_limit)
    admission = admit(context, tenant.id, len(prompts) * body.n * max_tokens, stream=body.stream)
    try:
        return await _completions(body, prompts, max_tokens, tenant, context, admission)
    finally:
        admission.end_of_handler()


def _sample_seed(seed: int | None, sample: int) -> int | None:
    """Sample ``sample``'s seed: reproducible from ``seed`` (wrapping, never past
    :data:`MAX_SEED`), or None (fresh randomness) when no seed was given."""
    return None if seed is None else (seed + sample) % (MAX_SEED + 1)


async def _completions(
    body: CompletionRequest,
    prompts: list[str],
    max_tokens: int,
    tenant: Any,
    context: Any,
    admission: Admission,
) -> Any:
    prefix = await context.run_blocking(resolve_prefix, context, tenant.id, body.model)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": f"prefix-{prefix.id}",
    }
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = 0
    stop = stop_sequences(body.stop)
    if body.stream:
        decoding = decoding_config(
            max_tokens, body.temperature, body.top_p, 1, body.seed, stop=stop, **body.penalties()
        )
        return _stream(
            context,
            prefix.request(prompts, decoding),
            head,
            shape="openai",
            admission=admission,
            include_usage=body.stream_options is not None and body.stream_options.include_usage,
        )
    # n samples: the same prompts with different seeds, decoded concurrently (one batch).
    seeds = [_sample_seed(body.seed, sample) for sample in range(body.n)]
    requests = [
        prefix.request(
            prompts,
            decoding_config(
                max_tokens, body.temperature, body.top_p, 1, seed, stop=stop, **body.penalties()
            ),
        )
        for seed in seeds
    ]
    results = await asyncio.gather(*(_run(context, r) for r in requests))
    for sample, result in enumerate(results):
        prompt_tokens += result.prompt_tokens if sample == 0 else 0
        completion_tokens += result.completion_tokens
        for index, (text, finish) in enumerate(
            zip(result.outputs, result.finish_reasons, strict=True)
        ):
            choices.append(
                {
                    "text": text,
                    "index": index * body.n + sample,
                    "logprobs": None,
                    "finish_reason": finish,
                }
            )
    choices.sort(key=lambda c: c["index"])
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return {**head, "choices": choices, "usage": usage}
