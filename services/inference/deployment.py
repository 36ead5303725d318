"""The inference deployment: frozen model + prefix cache + continuous batching.

Every replica can serve every tenant: the ingress resolves the tenant's active prefix
*version* per request (so activation, rollback and deletion take effect on the very next
request) and the replica fetches that immutable version from its cache or the blob store.
Requests are not multiplexed by tenant — Ray Serve splits batches by multiplexed model id,
which would undo cross-tenant batching; rows of all tenants share one decode loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from ray import serve

from common.architectures import context_problem, is_encoder_decoder, prefix_shape
from common.base_prefix import inference_prefix
from common.blobstore import BlobNotFoundError, build_blob_store
from common.config import Settings
from common.data import encode_prompt
from common.db.engine import create_db_engine, session_scope
from common.devices import choose_placement, place
from common.errors import IncompatiblePrefixError, InvalidInputError
from common.generation import DecodingConfig, GenerationRow
from common.prefix_file import Prefix, prefix_from_bytes, prompt_format
from common.shared_weights import SharedModel, materialize_model
from common.stop_sequences import StopStreamer, cut_at_stop
from services.inference.batcher import ContinuousBatcher
from services.inference.prefix_cache import PrefixCache


@dataclass(frozen=True)
class InferenceRequest:
    prefix_id: str
    object_key: str
    inputs: list[str]
    decoding: DecodingConfig
    # A stacked prefix's base prefix (resolved by the ingress); None: the prefix has none.
    base_prefix_id: str | None = None
    base_object_key: str | None = None
    # The inputs are rendered chats ending with the assistant's open turn: no separator.
    chat: bool = False


@dataclass(frozen=True)
class InferenceResult:
    outputs: list[str]
    prompt_tokens: int
    completion_tokens: int
    # Per output: "stop" (EOS or a stop sequence) or "length" (max_new_tokens reached).
    finish_reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StreamEnd:
    """The last item of :meth:`InferenceServer.stream`, after the text deltas."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def finish_reason(ids: list[int], decoding: DecodingConfig, stopped: bool) -> str:
    """OpenAI's: "stop" when a stop sequence or EOS ended the row, "length" when
    ``max_new_tokens`` did."""
    return "stop" if stopped or len(ids) < decoding.max_new_tokens else "length"


class InferenceServer:
    """Deployed by :func:`services.app_builder.build_app` with resources from settings."""

    def __init__(self, shared: SharedModel, settings: Settings) -> None:
        torch.set_num_threads(max(1, int(settings.inference_num_cpus)))
        self.settings = settings
        # Zero-copy from the object store on the CPU; on a GPU replica, a copy in GPU memory.
        self.loaded = place(
            materialize_model(shared), choose_placement(settings.inference_num_gpus)
        )
        self.shape = prefix_shape(self.loaded.model.config)  # encoder-decoder: with sections
        self.prompt_format = prompt_format(self.loaded.model.config)
        self.blobs = build_blob_store(settings)
        self.db = create_db_engine(settings)
        self.cache = PrefixCache(settings.prefix_cache_bytes, self._load_prefix)
        self.batcher = ContinuousBatcher(
            self.loaded,
            max_batch_size=settings.max_batch_size,
            batch_wait_s=settings.batch_wait_ms / 1000,
        )
        self.replica_id = uuid.uuid4().hex[:8]
        self.blob_reads = 0
        self.forget_calls = 0
        self._sweeper: asyncio.Task[None] | None = None

    # --- prefixes ------------------------------------------------------------------------

    async def _load_prefix(self, prefix_id: str, object_key: str) -> Prefix:
        self.blob_reads += 1
        data = await asyncio.to_thread(self.blobs.get_bytes, object_key)
        return prefix_from_bytes(
            data,
            source=f"prefix {prefix_id}",
            expected_fingerprint=self.loaded.fingerprint,
            expected_shape=self.shape,
        )

    async def _served_prefix(self, request: InferenceRequest) -> Prefix:
        """The tenant's prefix as it is served: a stacked prefix behind its base
        (``stack_prefixes(base, tenant)``, the base checked by id and fingerprint), both
        from the cache. A stacked prefix whose base is gone is refused (409), never served
        without it."""
        prefix = await self.cache.get(request.prefix_id, request.object_key)
        if prefix.base_mode != "stack":
            return prefix
        base = None
        if request.base_prefix_id is not None and request.base_object_key is not None:
            try:
                base = await self.cache.get(request.base_prefix_id, request.base_object_key)
            except BlobNotFoundError:
                base = None
        if base is None:
            raise IncompatiblePrefixError(
                f"prefix {request.prefix_id} is stacked on base prefix "
                f"{prefix.base_prefix_id}, which is no longer available; it is not served "
                "without its base"
            )
        return inference_prefix(prefix, base, base_prefix_id=request.base_prefix_id)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_deleted())

    async def _sweep_deleted(self) -> None:
        """Drop cached prefixes whose rows are gone (tenant or version deleted), so no
        replica keeps a deleted tenant's prefix in memory for long."""
        from common.db.crud import existing_base_prefix_ids, existing_prefix_ids

        while True:
            await asyncio.sleep(self.settings.prefix_cache_sweep_seconds)
            cached = self.cache.keys()
            if not cached:
                continue
            ids = [uuid.UUID(k) for k in cached]

            def existing(ids: list[uuid.UUID] = ids) -> set[str]:
                with session_scope(self.db) as session:
                    alive = existing_prefix_ids(session=session, prefix_ids=ids)
                    alive |= existing_base_prefix_ids(session=session, base_prefix_ids=ids)
                    return {str(i) for i in alive}

            try:
                alive = await asyncio.to_thread(existing)
            except Exception:  # database briefly unreachable: try again next round
                continue
            self.cache.evict(k for k in cached if k not in alive)

    # --- requests ------------------------------------------------------------------------

    async def _rows(self, request: InferenceRequest) -> list[GenerationRow]:
        """Validate before anything is queued: a bad request fails alone, never its batch."""
        request.decoding.validate()
        limit = self.settings.max_new_tokens_limit
        if request.decoding.max_new_tokens > limit:
            raise InvalidInputError(
                f"max_new_tokens is {request.decoding.max_new_tokens}; the limit is {limit}"
            )
        if not request.inputs:
            raise InvalidInputError("no inputs")
        self._ensure_sweeper()
        prefix = await self._served_prefix(request)
        if prefix.prompt_format != self.prompt_format:
            raise IncompatiblePrefixError(
                f"prefix {request.prefix_id} has an unknown prompt format"
            )
        config = self.loaded.model.config
        rows = []
        for number, text in enumerate(request.inputs, start=1):
            ids = encode_prompt(
                self.loaded.tokenizer,
                text,
                encoder_decoder=is_encoder_decoder(config),
                chat=request.chat,
            )
            problem = context_problem(
                config,
                prefix_length=prefix.prefix_length,
                input_tokens=len(ids),
                output_tokens=request.decoding.max_new_tokens,
            )
            if problem is not None:
                raise InvalidInputError(f"input {number} is too long: {problem}")
            rows.append(GenerationRow(ids, prefix.key_values))
        return rows

    def _decode(self, ids: list[int]) -> str:
        return str(self.loaded.tokenizer.decode(ids, skip_special_tokens=True))

    def _text(self, ids: list[int], stops: tuple[str, ...]) -> tuple[str, bool]:
        """The output text, cut before its earliest stop sequence, and whether one was
        found (cut before stripping: a stop sequence may be whitespace)."""
        text, stopped = cut_at_stop(self._decode(ids), stops)
        return text.strip(), stopped

    async def generate(self, request: InferenceRequest) -> InferenceResult:
        rows = await self._rows(request)
        outputs = await asyncio.gather(
            *(self.batcher.generate(row, request.decoding) for row in rows)
        )
        texts = [self._text(ids, request.decoding.stop) for ids in outputs]
        return InferenceResult(
            outputs=[text for text, _ in texts],
            prompt_tokens=sum(len(r.input_ids) for r in rows),
            completion_tokens=sum(len(ids) for ids in outputs),
            finish_reasons=[
                finish_reason(ids, request.decoding, stopped)
                for ids, (_, stopped) in zip(outputs, texts, strict=True)
            ],
        )

    async def stream(self, request: InferenceRequest) -> AsyncIterator[str | StreamEnd]:
        """Text deltas of the first input, token by token, then a :class:`StreamEnd`. Text
        that may still turn out to be the start of a stop sequence is held back until it
        cannot; a stop sequence and what follows are never sent."""
        (row,) = (await self._rows(request))[:1]
        stops = request.decoding.stop
        streamer = StopStreamer(stops)
        ids: list[int] = []
        seen = ""
        async for token in self.batcher.stream(row, request.decoding):
            ids.append(token)
            text = self._decode(ids)
            # Hold back a trailing replacement character: the next token may complete it.
            if text.endswith("\ufffd") or len(text) <= len(seen):
                continue
            piece = streamer.feed(text[len(seen) :])
            seen = text
            if piece:
                yield piece
            if streamer.stopped:
                break  # the decode loop ended the row on the same text
        if not streamer.stopped and len(text := self._decode(ids)) > len(seen):
            piece = streamer.feed(text[len(seen) :])  # the end, incomplete character or not
            if piece:
                yield piece
        if rest := streamer.flush():
            yield rest
        yield StreamEnd(
            finish_reason(ids, request.decoding, streamer.stopped),
            prompt_tokens=len(row.input_ids),
            completion_tokens=len(ids),
        )

    async def evict(self, prefix_ids: list[str]) -> int:
        return self.cache.evict(prefix_ids)

    async def forget(self, prefix_ids: list[str]) -> dict[str, Any]:
        """Drop these prefixes (an erased tenant's) and say which of them this replica still
        holds: none, unless a load of one is in flight (then ask again; with its blob gone,
        no new load can succeed). ``common.erasure.ServeReplicaEvictor`` asks every replica."""
        self.forget_calls += 1
        self.cache.evict(prefix_ids)
        held = [p for p in prefix_ids if p in self.cache or self.cache.loading(p)]
        return {"replica": self.replica_id, "held": held}

    async def stats(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "engine": asdict(self.batcher.stats),
            "cache": asdict(self.cache.stats),
            "cached_prefixes": self.cache.keys(),
            "blob_reads": self.blob_reads,
            "forget_calls": self.forget_calls,
            "zero_copy": self.loaded.zero_copy,
        }

    async def check_health(self) -> None:
        if not self.batcher.alive():
            raise RuntimeError("the decode loop or the beam lane stopped")


InferenceDeployment = serve.deployment(name="inference")(InferenceServer)
