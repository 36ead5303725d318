"""Continuous batching: one decode loop per replica serving every tenant's requests.

    batcher = ContinuousBatcher(loaded, max_batch_size=16)
    async for token_id in batcher.stream(GenerationRow(input_ids, prefix), decoding):
        ...                                           # or: await batcher.generate(row, decoding)

Requests arrive on the event loop; a decode thread admits them into the running
:class:`~common.generation.DecodeBatch` (:class:`~common.generation.EncoderDecoderBatch` for
BART, T5) between steps — each row with its own prefix, position offset and decoding
settings — and hands tokens back as they are produced. Finished rows leave at once, so a
short request never waits for a long one, nor a new one for a batch to drain.

A row with stop sequences ends as soon as its decoded text contains one (the token that
completed it is the row's last), so it leaves the batch at once and spends no more tokens.

Beam-search requests decode as their own batch (beams need reordering that a shared batch
of unrelated rows cannot do) on a lane of their own: a second thread that takes turns with
the decode loop step by step (:class:`_Turns`), so a long search of one tenant never stalls
the shared batch of the others, nor takes more than every other step from it. A search
checks between steps whether its client went away and stops there.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from common.generation import (
    DecodingConfig,
    GenerationCancelledError,
    GenerationRow,
    choose_tokens_per_row,
    count_token,
    decode_batch,
    generate,
    penalize,
    row_generator,
)
from common.model_loading import LoadedModel
from common.stop_sequences import StopChecker

_DONE = object()


@dataclass
class BatcherStats:
    forward_passes: int = 0  # prefill and decode passes of the shared batch (beams excluded)
    prefill_passes: int = 0  # one per group of requests admitted together
    decode_steps: int = 0
    requests: int = 0
    max_rows_in_batch: int = 0
    tokens: int = 0
    beam_requests: int = 0  # beam searches run on the beam lane
    beam_cancelled: int = 0  # beam searches stopped mid-search (client gone)
    failed_rows: int = 0  # rows that failed alone (their batch went on)
    stopped_rows: int = 0  # rows of the shared batch ended by a stop sequence


@dataclass
class _Request:
    row: GenerationRow
    decoding: DecodingConfig
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any]
    generator: torch.Generator | None = None
    produced: int = 0
    cancelled: bool = False
    stop_hit: StopChecker | None = None  # when the decoding has stop sequences
    # The caller wants the ids at the end only (generate, not stream): its event loop is
    # woken once per request instead of once per token (each wake-up is a thread hand-off).
    whole: bool = False
    ids: list[int] = field(default_factory=list)  # what it produced (whole or stop_hit)
    counts: torch.Tensor | None = None  # (vocab,) its tokens so far, when its decoding penalizes

    def emit(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            self.cancelled = True

    def token(self, token: int) -> None:
        if self.whole or self.stop_hit is not None:
            self.ids.append(token)
        if not self.whole:
            self.emit(token)

    def done(self) -> None:
        self.emit(list(self.ids) if self.whole else _DONE)


@dataclass
class _Running:
    requests: list[_Request] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (B, vocab): next-token logits of each running row


class _Turns:
    """The replica's compute, shared step by step between the decode loop and the beam lane:
    whoever holds the turn runs one forward pass; when both wait, they alternate. A replica
    is given its CPUs (or GPU) for one model at a time, so a beam search gets at most every
    other step while the shared batch has work, and all of them while it has none."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._last: str | None = None
        self._waiting: set[str] = set()

    def acquire(self, who: str) -> None:
        with self._cond:
            self._waiting.add(who)
            while self._busy or (self._last == who and len(self._waiting) > 1):
                self._cond.wait()
            self._waiting.discard(who)
            self._busy = True

    def release(self, who: str) -> None:
        with self._cond:
            self._busy, self._last = False, who
            self._cond.notify_all()


class ContinuousBatcher:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.005,
        stop_at_eos: bool = True,  # benchmarks turn it off to decode a fixed length
    ) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.eos_id = int(loaded.tokenizer.eos_token_id) if stop_at_eos else -1
        pad = loaded.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else loaded.tokenizer.eos_token_id)
        self.stats = BatcherStats()
        # Stop checks decode on the decode thread and the beam lane: their own tokenizer, so
        # they never share one with the event loop's encoding (a fast tokenizer's settings
        # are not safe to share between threads).
        self._stop_tokenizer = copy.deepcopy(loaded.tokenizer)
        # A DecodeBatch, or an EncoderDecoderBatch for BART/T5; touched by the decode thread only.
        self._batch = decode_batch(loaded.model, self.pad_id)
        self._incoming: queue.Queue[_Request | None] = queue.Queue()
        self._beams: queue.Queue[_Request | None] = queue.Queue()
        self._turns = _Turns()
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._beam_thread = threading.Thread(target=self._run_beams, name="beam-lane", daemon=True)
        self._thread.start()
        self._beam_thread.start()

    def close(self) -> None:
        self._incoming.put(None)
        self._beams.put(None)
        self._thread.join(timeout=10)
        self._beam_thread.join(timeout=10)

    def alive(self) -> bool:
        """Whether the decode loop and the beam lane still run (the replica's health check)."""
        return self._thread.is_alive() and self._beam_thread.is_alive()

    def _submit(self, row: GenerationRow, decoding: DecodingConfig, *, whole: bool) -> _Request:
        decoding.validate()
        decoding = decoding.normalized()
        request = _Request(row, decoding, asyncio.get_running_loop(), asyncio.Queue(), whole=whole)
        request.generator = row_generator(decoding)
        if decoding.stop:
            request.stop_hit = StopChecker(self._stop_tokenizer, decoding.stop)
        (self._beams if decoding.num_beams > 1 else self._incoming).put(request)
        return request

    async def stream(self, row: GenerationRow, decoding: DecodingConfig) -> AsyncIterator[int]:
        """Token ids as they are decoded (EOS not included)."""
        request = self._submit(row, decoding, whole=False)
        try:
            while True:
                item = await request.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield int(item)
        finally:
            request.cancelled = True  # a client that went away stops costing work

    async def generate(self, row: GenerationRow, decoding: DecodingConfig) -> list[int]:
        """The token ids of the row (EOS not included), handed back once at its end."""
        request = self._submit(row, decoding, whole=True)
        try:
            item = await request.out.get()
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, list)
            return item
        finally:
            request.cancelled = True  # a client that went away stops costing work

    # --- the decode thread -------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        running = _Running()
        while True:
            arrivals = self._admit(wait=not running.requests)
            if arrivals is None:
                return
            shared = [r for r in arrivals if not r.cancelled]
            for request in arrivals:
                if request.cancelled:
                    request.done()
            self._turns.acquire("decode")
            try:
                if shared:
                    self._join(running, shared)
                if running.requests:
                    self._step(running)
            finally:
                self._turns.release("decode")

    def _admit(self, *, wait: bool) -> list[_Request] | None:
        """New requests, up to the free rows. Idle: block for the first and take whatever
        else is queued; a request alone starts at once (no batch window: one call at a time
        never waits for company), while a burst (others queued with it) waits up to
        ``batch_wait_s`` for the rest of it, so it starts as one batch. Busy: the arrivals
        join the running batch between two steps, without waiting."""
        arrivals: list[_Request] = []
        if wait:
            first = self._incoming.get()
            if first is None:
                return None
            arrivals.append(first)
            more = self._drain()
            if more is None:
                return None
            arrivals += more
            if len(arrivals) == 1:
                return arrivals
            deadline = time.monotonic() + self.batch_wait_s
            while len(arrivals) < self.max_batch_size:
                try:
                    item = self._incoming.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    return None
                arrivals.append(item)
            return arrivals
        return self._drain()

    def _drain(self) -> list[_Request] | None:
        """What is queued now, without waiting (None: the batcher is closing)."""
        arrivals: list[_Request] = []
        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return arrivals
            if item is None:
                return None
            arrivals.append(item)

    def _join(self, running: _Running, requests: list[_Request]) -> None:
        room = self.max_batch_size - len(running.requests)
        if room <= 0 or len(requests) > room:  # over capacity: the rest waits its turn
            for request in requests[max(room, 0) :]:
                self._incoming.put(request)
            requests = requests[: max(room, 0)]
        if not requests:
            return
        try:
            logits = self._batch.add([r.row for r in requests])
        except Exception as error:  # e.g. out of memory: fail these rows, not the others
            for request in requests:
                request.emit(error)
            return
        self.stats.requests += len(requests)
        self.stats.forward_passes += 1
        self.stats.prefill_passes += 1
        running.requests += requests
        running.logits = logits if running.logits is None else torch.cat([running.logits, logits])
        self.stats.max_rows_in_batch = max(self.stats.max_rows_in_batch, len(running.requests))

    def _step(self, running: _Running) -> None:
        assert running.logits is not None
        batch = self._batch
        requests = running.requests
        try:
            # A row that cannot be decoded (non-finite scores, sampling failed) fails alone:
            # its error goes to its request and it leaves the batch like a finished row.
            decodings = [r.decoding for r in requests]
            logits = penalize(running.logits, decodings, [r.counts for r in requests])
            tokens, failed = choose_tokens_per_row(
                logits, decodings, [r.generator for r in requests]
            )
            keep = []
            for index, (request, token) in enumerate(zip(requests, tokens.tolist(), strict=True)):
                if index in failed:
                    self.stats.failed_rows += 1
                    request.emit(failed[index])
                    continue
                finished = token == self.eos_id or request.cancelled
                if not finished:
                    request.produced += 1
                    self.stats.tokens += 1
                    request.token(token)
                    if request.decoding.penalizes:
                        request.counts = count_token(request.counts, token, logits.shape[-1])
                    finished = request.produced >= request.decoding.max_new_tokens
                    if request.stop_hit is not None and request.stop_hit(request.ids):
                        finished = True
                        self.stats.stopped_rows += 1
                if finished:
                    request.done()
                else:
                    keep.append(index)
            kept = torch.tensor(keep, dtype=torch.long)
            batch.select(kept)
            running.requests = [requests[i] for i in keep]
            if running.requests:
                running.logits = batch.step(tokens[kept])
                self.stats.forward_passes += 1
                self.stats.decode_steps += 1
            else:
                running.logits = None
        except Exception as error:  # the shared forward itself failed (e.g. out of memory)
            for request in running.requests:
                request.emit(error)
            running.requests, running.logits = [], None
            self._batch = decode_batch(self.loaded.model, self.pad_id)

    def _run_beams(self) -> None:
        """The beam lane: one search at a time, in arrival order, beside the decode loop."""
        torch.set_grad_enabled(False)
        while (request := self._beams.get()) is not None:
            if request.cancelled:
                request.done()
                continue
            self._beam_search(request)

    def _beam_search(self, request: _Request) -> None:
        def between_steps() -> bool:
            # Give the shared batch its turn between two beam steps, then ask whether the
            # client is still there.
            self._turns.release("beam")
            self._turns.acquire("beam")
            return request.cancelled

        self._turns.acquire("beam")
        try:
            (tokens,) = generate(
                self.loaded.model,
                [request.row],
                request.decoding,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                should_stop=between_steps,
                tokenizer=self._stop_tokenizer,
            )
        except GenerationCancelledError:
            self.stats.beam_cancelled += 1
            request.done()
            return
        except Exception as error:
            request.emit(error)
            return
        finally:
            self._turns.release("beam")
        self.stats.requests += 1
        self.stats.beam_requests += 1
        for token in tokens:
            request.token(token)
        request.done()
