"""Batched generation where every row may have its own prefix.

Example::

    rows = [GenerationRow(input_ids=ids_a, prefix=prefix_a),  # (layers, 2, kv_heads, P, head_dim)
            GenerationRow(input_ids=ids_b, prefix=None)]      # the bare model
    out = generate(model, rows, DecodingConfig(max_new_tokens=32),
                   eos_token_id=eos, pad_token_id=pad)        # token ids per row, EOS excluded

Rows are laid out as in :mod:`common.kv_cache` (prefixes padded to the longest with masked
slots, inputs left-padded, positions starting at each row's own prefix length), so a row's
output does not depend on its batch; decoding is greedy, sampling (temperature, top-p, a
seeded generator per row) or beam search, each with OpenAI's presence and frequency
penalties on the tokens a row has generated (:func:`penalize`). :class:`DecodeBatch` (and
:class:`EncoderDecoderBatch` for BART, T5; :func:`decode_batch` picks one) is the step-wise
form the inference batcher uses: rows join and leave between steps.

Why not ``model.generate()``: it derives ``cache_position`` from the cache length and would
drop prompt tokens for a prefix that has no input ids, extends the cache it is given in
place, and assumes one position offset for the whole batch. Here a fresh cache is built per
call from copies of the prefixes (a stored prefix is never mutated), and finished rows leave
the batch between steps.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.nn import functional as F
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

from common.architectures import (
    context_problem,
    decoder_start_id,
    is_encoder_decoder,
    prefix_shape,
)
from common.data import encode_prompt
from common.encoder_decoder import decode, encode
from common.errors import DecodingFailedError, IncompatiblePrefixError, InvalidInputError
from common.kv_cache import (
    concat_rows,
    cross_attention_ready,
    encoder_decoder_cache,
    pad_cross_right,
    pad_left,
    pad_prefixes,
    prefix_cache,
    reorder_rows,
    sub_prefix,
    trim_left,
)
from common.model_loading import LoadedModel
from common.prefix_file import Prefix, prompt_format
from common.stop_sequences import StopChecker, cut_at_stop, validate_stops

# A sampling temperature below this is greedy decoding: dividing logits by ~1e-300 overflows
# to inf (NaN probabilities), and anything this small is argmax in all but rounding anyway.
GREEDY_BELOW_TEMPERATURE = 1e-4
# Seeds are what a torch generator takes without wrapping: 0 … 2**63 - 1 (signed 64-bit,
# what every JSON client can send exactly).
MAX_SEED = 2**63 - 1
# OpenAI's range for presence_penalty and frequency_penalty.
MAX_PENALTY = 2.0


@dataclass(frozen=True)
class DecodingConfig:
    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    length_penalty: float = 1.0
    seed: int | None = None
    # Text that ends a row (common/stop_sequences.py); it and what follows is not returned.
    stop: tuple[str, ...] = ()
    # OpenAI's penalties on tokens the row already generated (:func:`penalize`): positive
    # values discourage repeating them, negative ones encourage it.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def penalizes(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise InvalidInputError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise InvalidInputError("choose sampling or beam search, not both")
        # Written as "not (in range)" so that NaN is refused too.
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise InvalidInputError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidInputError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:  # NaN fails too
                raise InvalidInputError(
                    f"{name} must be in [{-MAX_PENALTY}, {MAX_PENALTY}], got {value}"
                )
        validate_stops(self.stop)

    def normalized(self) -> DecodingConfig:
        """The same decoding with degenerate sampling made explicit: a temperature below
        :data:`GREEDY_BELOW_TEMPERATURE` is greedy (so is sampling that keeps one token)."""
        if self.do_sample and self.temperature < GREEDY_BELOW_TEMPERATURE:
            return replace(self, do_sample=False, temperature=1.0, top_p=1.0)
        return self


@dataclass(frozen=True)
class GenerationRow:
    input_ids: Sequence[int]
    prefix: torch.Tensor | None  # (layers, 2, kv_heads, P, head_dim), or None: the bare model


def pad_inputs(
    rows: Sequence[GenerationRow], pad_id: int, *, align_right: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' input ids padded to the longest, and their mask, both ``(n, T)`` on the CPU.

    ``align_right``: a decoder-only batch pads on the left, so every row's last token is the
    last position; an encoder reads its input from position 0, so it pads on the right."""
    longest = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    input_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, item in enumerate(rows):
        if len(item.input_ids) == 0:
            raise InvalidInputError(f"row {row}: empty input")
        start = longest - len(item.input_ids) if align_right else 0
        input_ids[row, start : start + len(item.input_ids)] = torch.tensor(list(item.input_ids))
        input_mask[row, start : start + len(item.input_ids)] = 1
    return input_ids, input_mask


class DecodeBatch:
    """Decoding state of a set of rows: one cache, a 2-D mask and each row's next position.

    Rows can join between steps (:meth:`add`: their prompts are prefilled together, then
    merged by left-padding whichever cache is shorter with masked slots) and leave
    (:meth:`select`), which is what continuous batching needs; every row keeps its own
    positions, so joining or leaving never changes another row's result."""

    def __init__(self, model: PreTrainedModel, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.cache: DynamicCache | EncoderDecoderCache | None = None
        self.attention_mask = torch.zeros((0, 0), dtype=torch.long)  # (B, cache length + 1)
        self.next_position = torch.zeros((0,), dtype=torch.long)  # (B,)
        self.forward_passes = 0

    def __len__(self) -> int:
        return int(self.next_position.shape[0])

    def add(self, rows: Sequence[GenerationRow]) -> torch.Tensor:
        """Prefill ``rows`` and append them; return their next-token logits ``(n, vocab)``."""
        key_values, prefix_mask = pad_prefixes(
            [r.prefix for r in rows],
            prefix_shape(self.model.config),
            dtype=self.dtype,
            device=self.device,
        )  # (layers, 2, n, kv, Pmax, hs) on the model's device, (n, Pmax)
        prefix_mask = prefix_mask.cpu()  # masks and positions are kept on the CPU
        cache = prefix_cache(key_values, self.model.config)
        input_ids, input_mask = pad_inputs(rows, self.pad_id, align_right=True)  # (n, T)
        prefix_lengths = prefix_mask.sum(dim=1, keepdim=True)  # (n, 1)
        # Real tokens of row i sit at positions P_i, P_i + 1, …; padding gets a dummy 0.
        position_ids = (prefix_lengths + input_mask.cumsum(dim=1) - 1).clamp(min=0) * input_mask
        mask = torch.cat([prefix_mask, input_mask], dim=1)  # (n, Pmax + T)
        logits = self._forward(cache, mask, input_ids, position_ids)
        next_position = prefix_lengths.squeeze(1) + input_mask.sum(dim=1)  # (n,)
        if self.cache is None or len(self) == 0:
            self.cache, self.attention_mask, self.next_position = cache, mask, next_position
            return logits
        # Equalize cache lengths with masked slots on the left, then stack the rows.
        mine, theirs = self.attention_mask.shape[1], mask.shape[1]
        pad_left(self.cache, theirs - mine)
        pad_left(cache, mine - theirs)
        width = max(mine, theirs)
        self.attention_mask = torch.cat(
            [F.pad(self.attention_mask, (width - mine, 0)), F.pad(mask, (width - theirs, 0))]
        )
        self.cache = concat_rows(self.cache, cache)
        self.next_position = torch.cat([self.next_position, next_position])
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``(B,)``; return next-token logits ``(B, vocab)``."""
        assert isinstance(self.cache, DynamicCache)
        ones = torch.ones((len(tokens), 1), dtype=torch.long)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        positions = self.next_position.unsqueeze(1)
        self.next_position = self.next_position + 1
        return self._forward(self.cache, self.attention_mask, tokens.unsqueeze(1), positions)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) only these rows: finished rows leave, beams get reordered. Slots
        that no remaining row attends to are dropped."""
        assert self.cache is not None
        reorder_rows(self.cache, rows)
        self.attention_mask = self.attention_mask.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)
        if len(rows):
            unused = int(self.attention_mask.any(dim=0).long().argmax())  # leading all-zero columns
            trim_left(self.cache, unused)
            self.attention_mask = self.attention_mask[:, unused:]

    def _forward(
        self,
        cache: DynamicCache,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        self.forward_passes += 1
        output = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1].float().cpu()  # (B, vocab); token choice on the CPU


class EncoderDecoderBatch(DecodeBatch):
    """:class:`DecodeBatch` for encoder-decoder models (BART, T5).

    Per row, the encoder side is ``| unused | prefix P_i | input T_i | padding |`` (prefixes
    right-aligned, inputs right-padded) under one mask that serves the encoder's
    self-attention and the decoder's cross-attention; the decoder's self-attention cache is
    ``| unused | prefix P_i | start token, generated tokens… |``, each row's decoder tokens at
    positions ``P_i, P_i + 1, …``. Every row's content is contiguous at the right end of its
    slots, so relative positions (T5) are those of the row alone; rows join (self cache
    left-padded, cross cache right-padded with masked slots) and leave between steps as in
    :class:`DecodeBatch`."""

    def __init__(self, model: PreTrainedModel, pad_id: int) -> None:
        super().__init__(model, pad_id)
        self.shape = prefix_shape(model.config)
        start_id = decoder_start_id(model.config)
        assert start_id is not None  # an encoder-decoder config always has one
        self.start_id = start_id
        self.cross_mask = torch.zeros((0, 0), dtype=torch.long)  # (B, cross cache length)
        # After the first decoder pass every cross-attention layer reads its keys/values from
        # the cache and the encoder outputs only tell the model their batch size: one
        # position per row is kept, not the whole encoder output.
        self.encoder_stub = torch.zeros((0, 1, 0), dtype=self.dtype)  # (B, 1, d_model)

    def add(self, rows: Sequence[GenerationRow]) -> torch.Tensor:
        """Encode ``rows``, run the decoder's first pass and append them; return their
        next-token logits ``(n, vocab)``."""
        key_values, prefix_mask = pad_prefixes(
            [r.prefix for r in rows],
            self.shape,
            dtype=self.dtype,
            device=self.device,
            align_right=True,
        )  # (layers, 2, n, kv, Pmax, hs) on the model's device, (n, Pmax)
        prefix_mask = prefix_mask.cpu()  # masks and positions are kept on the CPU
        batch = len(rows)
        input_ids, input_mask = pad_inputs(rows, self.pad_id, align_right=False)  # (n, T)
        # One mask for the encoder's self-attention and the decoder's cross-attention: the
        # encoder and cross-attention prefixes share the row's slots.
        cross_mask = torch.cat([prefix_mask, input_mask], dim=1)  # (n, Pmax + T)
        hidden = encode(
            self.model,
            input_ids.to(self.device),
            cross_mask.to(self.device),
            sub_prefix(key_values, self.shape, "encoder"),
        )  # (n, T, d_model)
        cache = encoder_decoder_cache(
            sub_prefix(key_values, self.shape, "decoder"),
            sub_prefix(key_values, self.shape, "cross"),
        )
        mask = torch.cat([prefix_mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        prefix_lengths = prefix_mask.sum(dim=1)  # (n,)
        self.forward_passes += 1
        logits = (
            decode(
                self.model,
                encoder_hidden=hidden,
                cross_mask=cross_mask.to(self.device),
                decoder_input_ids=torch.full((batch, 1), self.start_id, device=self.device),
                decoder_mask=mask.to(self.device),
                cache=cache,
                positions=prefix_lengths.unsqueeze(1).to(self.device),  # the start token at P_i
            )[:, -1]
            .float()
            .cpu()
        )  # (n, vocab)
        stub, next_position = hidden[:, :1], prefix_lengths + 1
        if self.cache is None or len(self) == 0:
            self.cache, self.attention_mask, self.next_position = cache, mask, next_position
            self.cross_mask, self.encoder_stub = cross_mask, stub
            return logits
        assert isinstance(self.cache, EncoderDecoderCache)
        # Equalize both caches' lengths with masked slots, then stack the rows.
        mine, theirs = self.attention_mask.shape[1], mask.shape[1]
        pad_left(self.cache, theirs - mine)
        pad_left(cache, mine - theirs)
        width = max(mine, theirs)
        self.attention_mask = torch.cat(
            [F.pad(self.attention_mask, (width - mine, 0)), F.pad(mask, (width - theirs, 0))]
        )
        mine, theirs = self.cross_mask.shape[1], cross_mask.shape[1]
        pad_cross_right(self.cache, theirs - mine)
        pad_cross_right(cache, mine - theirs)
        width = max(mine, theirs)
        self.cross_mask = torch.cat(
            [F.pad(self.cross_mask, (0, width - mine)), F.pad(cross_mask, (0, width - theirs))]
        )
        self.cache = concat_rows(self.cache, cache)
        self.encoder_stub = torch.cat([self.encoder_stub, stub])
        self.next_position = torch.cat([self.next_position, next_position])
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``(B,)``; return next-token logits ``(B, vocab)``."""
        assert isinstance(self.cache, EncoderDecoderCache)
        layers = self.shape.section("decoder")
        assert cross_attention_ready(self.cache, layers.stop - layers.start)
        ones = torch.ones((len(tokens), 1), dtype=torch.long)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        positions = self.next_position.unsqueeze(1)
        self.next_position = self.next_position + 1
        self.forward_passes += 1
        return (
            decode(
                self.model,
                encoder_hidden=self.encoder_stub,
                cross_mask=self.cross_mask.to(self.device),
                decoder_input_ids=tokens.unsqueeze(1).to(self.device),
                decoder_mask=self.attention_mask.to(self.device),
                cache=self.cache,
                positions=positions.to(self.device),
            )[:, -1]
            .float()
            .cpu()
        )  # (B, vocab)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) only these rows (see :meth:`DecodeBatch.select`)."""
        super().select(rows)
        self.cross_mask = self.cross_mask.index_select(0, rows)
        self.encoder_stub = self.encoder_stub.index_select(0, rows.to(self.encoder_stub.device))


def decode_batch(model: PreTrainedModel, pad_id: int) -> DecodeBatch:
    """An empty decoding state of the right kind for ``model``."""
    if is_encoder_decoder(model.config):
        return EncoderDecoderBatch(model, pad_id)
    return DecodeBatch(model, pad_id)


def row_generator(decoding: DecodingConfig) -> torch.Generator | None:
    """One generator per sampled row, so a row's samples do not depend on its batch. Seeded
    rows are reproducible; without a seed every row draws fresh randomness (two users
    sampling the same prompt must not get the same text)."""
    if not decoding.do_sample:
        return None
    seed = decoding.seed if decoding.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(seed)


def penalize(
    logits: torch.Tensor,
    decodings: Sequence[DecodingConfig],
    counts: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: each row's logits ``(B, vocab)`` minus
    ``frequency_penalty * count + presence_penalty * (count > 0)`` per token, where
    ``counts[i]`` ``(vocab,)`` counts the tokens row ``i`` has generated (None: nothing to
    penalize). Rows without penalties are left as they are; ``logits`` is not modified."""
    rows = [i for i, d in enumerate(decodings) if d.penalizes and counts[i] is not None]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        count = counts[i]
        assert count is not None
        logits[i] -= _penalty(count, decodings[i])
    return logits


def _penalty(counts: torch.Tensor, decoding: DecodingConfig) -> torch.Tensor:
    """What the penalties subtract from logits, for token counts of any shape ``(..., vocab)``."""
    return decoding.frequency_penalty * counts + decoding.presence_penalty * (counts > 0)


def count_token(counts: torch.Tensor | None, token: int, vocab: int) -> torch.Tensor:
    """``counts`` ``(vocab,)`` of a row's generated tokens with ``token`` added (a new
    tensor of zeros when None)."""
    if counts is None:
        counts = torch.zeros(vocab)
    counts[token] += 1
    return counts


def _unusable_rows(logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` True where a row's logits ``(B, vocab)`` cannot be decoded from: a NaN or
    +inf anywhere, or nothing above -inf."""
    return logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1) | logits.isneginf().all(-1)


def _sample(
    logits: torch.Tensor, decoding: DecodingConfig, generator: torch.Generator | None
) -> int:
    """One token from finite logits ``(vocab,)`` with temperature and top-p."""
    # float64 and the max subtracted first: no overflow for any temperature above the
    # greedy threshold and any finite logits.
    scaled = (logits.double() - logits.max().double()) / decoding.temperature  # (vocab,)
    probs = F.softmax(scaled, dim=-1)  # (vocab,)
    if decoding.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always the first one).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= decoding.top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        raise DecodingFailedError("decoding failed: the sampling probabilities are not finite")
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def choose_tokens_per_row(
    logits: torch.Tensor,
    decodings: Sequence[DecodingConfig],
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, dict[int, DecodingFailedError]]:
    """Next token per row ``(B,)`` from logits ``(B, vocab)``: argmax for greedy rows,
    temperature and top-p sampling for sampled rows (each with its own generator), and the
    rows that cannot go on, each with its own error (their token is meaningless). Nothing
    here trusts that the settings were validated: one row's failure is never the batch's."""
    tokens = logits.argmax(dim=-1)  # (B,)
    failed: dict[int, DecodingFailedError] = {
        int(row): DecodingFailedError(
            "decoding failed: the model's scores for this input are not finite"
        )
        for row in _unusable_rows(logits).nonzero().flatten().tolist()
    }
    for row, (decoding, generator) in enumerate(zip(decodings, generators, strict=True)):
        if row in failed:
            continue
        decoding = decoding.normalized()
        if not decoding.do_sample:
            continue
        try:
            tokens[row] = _sample(logits[row], decoding, generator)
        except DecodingFailedError as error:
            failed[row] = error
        except Exception as error:  # anything else sampling raises: this row only
            failed[row] = DecodingFailedError(f"decoding failed: {type(error).__name__}")
    return tokens, failed


def choose_tokens(
    logits: torch.Tensor,
    decodings: Sequence[DecodingConfig],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """:func:`choose_tokens_per_row` for a batch that fails as a whole (one caller's rows)."""
    tokens, failed = choose_tokens_per_row(logits, decodings, generators)
    if failed:
        raise failed[min(failed)]
    return tokens


def _sample_or_greedy(
    model: PreTrainedModel,
    rows: Sequence[GenerationRow],
    decoding: DecodingConfig,
    eos_id: int,
    pad_id: int,
    stop_hit: StopChecker | None = None,
) -> list[list[int]]:
    generators = [row_generator(decoding) for _ in rows]
    state = decode_batch(model, pad_id)
    outputs: list[list[int]] = [[] for _ in rows]
    counts: list[torch.Tensor | None] = [None] * len(rows)  # generated tokens, when penalized
    running = torch.arange(len(rows))  # original index of each row still in the batch
    logits = state.add(rows)
    for step in range(decoding.max_new_tokens):
        decodings = [decoding] * len(running)
        logits = penalize(logits, decodings, [counts[i] for i in running])
        tokens = choose_tokens(logits, decodings, [generators[i] for i in running])
        keep = tokens != eos_id
        for index, (row, token) in enumerate(zip(running.tolist(), tokens.tolist(), strict=True)):
            if token != eos_id:
                outputs[row].append(token)
                if decoding.penalizes:
                    counts[row] = count_token(counts[row], token, logits.shape[-1])
                if stop_hit is not None and stop_hit(outputs[row]):
                    keep[index] = False  # its text now holds a stop sequence: it is done
        if step + 1 == decoding.max_new_tokens or not keep.any():
            break
        if not keep.all():
            kept = keep.nonzero().squeeze(1)
            state.select(kept)
            running, tokens = running[kept], tokens[kept]
        logits = state.step(tokens)
    return outputs


class GenerationCancelledError(Exception):
    """The caller asked a running generation to stop (its client went away)."""


def _beam_search(
    model: PreTrainedModel,
    rows: Sequence[GenerationRow],
    decoding: DecodingConfig,
    eos_id: int,
    pad_id: int,
    should_stop: Callable[[], bool] | None = None,
    stop_hit: StopChecker | None = None,
) -> list[list[int]]:
    """Beam search; a hypothesis whose text reaches a stop sequence is finished like one
    that reached EOS (with the token that completed it: the text is cut afterwards)."""
    beams, batch = decoding.num_beams, len(rows)
    state = decode_batch(model, pad_id)
    scores = torch.zeros((batch, beams))
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    sequences = torch.zeros((batch * beams, 0), dtype=torch.long)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in rows]
    done = [False] * batch

    def normalized(score: float, length: int) -> float:
        return score / (length**decoding.length_penalty)

    logits = state.add([row for row in rows for _ in range(beams)])  # B·K rows
    vocab = logits.shape[-1]
    # Tokens each hypothesis generated, for the penalties: (B·K, vocab), or None without.
    counts = torch.zeros((batch * beams, vocab)) if decoding.penalizes else None
    for step in range(decoding.max_new_tokens):
        if should_stop is not None and should_stop():
            raise GenerationCancelledError(f"beam search cancelled after {step} steps")
        if _unusable_rows(logits).any():
            raise DecodingFailedError(
                "decoding failed: the model's scores for this input are not finite"
            )
        if counts is not None:  # one decoding for every hypothesis: all rows at once
            logits = logits - _penalty(counts, decoding)
        log_probs = F.log_softmax(logits, dim=-1)  # (B·K, vocab)
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beams * vocab)
        top_scores, top_index = candidates.topk(min(2 * beams, beams * vocab), dim=1)
        next_scores = torch.full((batch, beams), float("-inf"))
        next_tokens = torch.full((batch, beams), pad_id, dtype=torch.long)
        origins = torch.arange(batch * beams).view(batch, beams).clone()
        for b in range(batch):
            if done[b]:
                continue
            slot = 0
            for score, index in zip(top_scores[b].tolist(), top_index[b].tolist(), strict=True):
                origin, token = divmod(index, vocab)
                stopped = (
                    token != eos_id
                    and stop_hit is not None
                    and stop_hit([*sequences[b * beams + origin].tolist(), token])
                )
                if token == eos_id or stopped:
                    # An end ranked outside the top K beams is not a finished hypothesis.
                    if slot < beams and score > float("-inf"):
                        tokens = sequences[b * beams + origin].tolist()
                        ended = [*tokens, token] if stopped else tokens
                        finished[b].append((normalized(score, step + 1), ended))
                else:
                    next_scores[b, slot], next_tokens[b, slot] = score, token
                    origins[b, slot] = b * beams + origin
                    slot += 1
                if slot == beams:
                    break
            finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:beams]
            best_running = normalized(float(next_scores[b].max()), step + 1)
            if len(finished[b]) == beams and finished[b][-1][0] >= best_running:
                done[b] = True
        if all(done) or step + 1 == decoding.max_new_tokens:
            sequences = torch.cat([sequences[origins.view(-1)], next_tokens.view(-1, 1)], dim=1)
            scores = next_scores
            break
        flat_origins = origins.view(-1)
        sequences = torch.cat([sequences[flat_origins], next_tokens.view(-1, 1)], dim=1)
        if counts is not None:  # each beam inherits its origin's counts, plus its new token
            counts = counts[flat_origins]
            counts[torch.arange(batch * beams), next_tokens.view(-1)] += 1
        scores = next_scores
        state.select(flat_origins)
        logits = state.step(next_tokens.view(-1))

    results = []
    for b in range(batch):
        hypotheses = list(finished[b])
        if not done[b]:
            for k in range(beams):
                if scores[b, k] > float("-inf"):
                    length = sequences.shape[1]
                    hypotheses.append(
                        (normalized(float(scores[b, k]), length), sequences[b * beams + k].tolist())
                    )
        best = max(hypotheses, key=lambda h: h[0]) if hypotheses else (0.0, [])
        results.append(best[1])
    return results


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    rows: Sequence[GenerationRow],
    decoding: DecodingConfig,
    *,
    eos_token_id: int,
    pad_token_id: int,
    should_stop: Callable[[], bool] | None = None,
    tokenizer: Any = None,
) -> list[list[int]]:
    """Generated token ids per row (EOS not included). ``should_stop`` is asked between
    beam-search steps (:class:`GenerationCancelledError` when it says so). A row with stop
    sequences (``decoding.stop``, which needs the ``tokenizer``) ends with the token whose
    text completes one; cut the text with :func:`common.stop_sequences.cut_at_stop`."""
    decoding.validate()
    decoding = decoding.normalized()
    if not rows:
        return []
    stop_hit = None
    if decoding.stop:
        if tokenizer is None:
            raise ValueError("stop sequences need the tokenizer")
        stop_hit = StopChecker(tokenizer, decoding.stop)
    if decoding.num_beams > 1:
        return _beam_search(
            model, rows, decoding, eos_token_id, pad_token_id, should_stop, stop_hit
        )
    return _sample_or_greedy(model, rows, decoding, eos_token_id, pad_token_id, stop_hit)


def generate_texts(
    loaded: LoadedModel,
    requests: Sequence[tuple[Prefix | None, str]],
    decoding: DecodingConfig,
) -> list[str]:
    """Text in, text out: each request is ``(prefix or None, input text)``, formatted the way
    training formats inputs. Prefixes must have been loaded against ``loaded`` (fingerprint
    checked); an input that does not fit the context is refused before any work."""
    tokenizer, config = loaded.tokenizer, loaded.model.config
    expected_format = prompt_format(config)
    rows = []
    for number, (prefix, text) in enumerate(requests, start=1):
        if prefix is not None and prefix.prompt_format != expected_format:
            raise IncompatiblePrefixError(
                f"input {number}: prefix prompt format {prefix.prompt_format!r} is not "
                f"{expected_format!r}"
            )
        if prefix is not None and prefix.base_model_fingerprint != loaded.fingerprint:
            raise IncompatiblePrefixError(
                f"input {number}: the prefix was trained for another base model"
            )
        ids = encode_prompt(tokenizer, text, encoder_decoder=is_encoder_decoder(config))
        prefix_length = 0 if prefix is None else prefix.prefix_length
        problem = context_problem(
            config,
            prefix_length=prefix_length,
            input_tokens=len(ids),
            output_tokens=decoding.max_new_tokens,
        )
        if problem is not None:
            raise InvalidInputError(f"input {number} is too long: {problem}")
        rows.append(GenerationRow(ids, None if prefix is None else prefix.key_values))
    outputs = generate(
        loaded.model,
        rows,
        decoding,
        eos_token_id=int(tokenizer.eos_token_id),
        pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        tokenizer=tokenizer,
    )
    texts = [str(tokenizer.decode(ids, skip_special_tokens=True)) for ids in outputs]
    return [cut_at_stop(text, decoding.stop)[0].strip() for text in texts]
