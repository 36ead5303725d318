"""The prefix-tuning training loop: a plain loop over the frozen model.

Only the :class:`~common.prefix_encoder.PrefixEncoder` (``P'`` and the MLP) trains; the base
model runs in eval mode with ``requires_grad=False``, so it gets no gradients and no
optimizer state. The objective is ``log p(y | x, P)``: loss on output tokens only.

    loss_reduction="sequence_sum": sum of token losses per sequence, averaged over the batch
                                   (the paper's code)
    loss_reduction="token_mean":   mean over every output token of the batch

AdamW, linear warmup then linear decay (warmup matters in low-data runs), gradient clipping,
a seed, and an optional validation set with early stopping: the returned prefix is the one
with the best validation loss. How many steps, and how often validation runs, is
:func:`common.training_budget.plan_budget`: ``epochs`` given, that many epochs validated at
each epoch's end; ``epochs=None`` (the default), an automatic budget from the data size.

Speed (``bench/train_throughput.py``): from 256 examples up (two pools at batch 8), each
epoch's batches are grouped by length (:func:`length_grouped_batches`: a shuffled pool of
batches is sorted by length, cut into batches, and the batches shuffled), so fewer padding
positions are computed; smaller datasets get a plain shuffle (:func:`epoch_batches` says
why); and on a CPU
with native bfloat16 (AVX512-BF16 or AMX) the frozen model's forward and backward can run
under bfloat16 autocast (``compute_dtype="auto"`` or ``"bfloat16"``, opt-in; float32 by
default; :func:`compute_precision`), while the trained
parameters, their gradients and AdamW stay float32 and the loss is taken in float32.
Validation losses are always computed in float32.

Encoder-decoder models (BART, T5) train the same way: the prefix carries three sub-prefixes
(encoder self-attention, decoder self-attention, cross-attention; see
:mod:`common.encoder_decoder`), produced by the one reparameterization MLP, and the loss is
on the decoder's tokens.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from common.architectures import (
    PrefixShape,
    decoder_start_id,
    is_encoder_decoder,
    max_positions,
    prefix_shape,
)
from common.base_prefix import BASE_MODES, BaseMode, key_values_fingerprint, stack_prefixes
from common.data import IGNORE_INDEX, Batch, EncodedExample, Example, collate, encode_examples
from common.encoder_decoder import prefix_seq2seq_logits
from common.errors import InvalidInputError
from common.kv_cache import expand_prefix, prefix_cache
from common.model_loading import LoadedModel
from common.prefix_encoder import PrefixEncoder
from common.prefix_file import Prefix, prompt_format
from common.prefix_init import build_prefix_encoder
from common.training_budget import plan_budget
from common.training_config import TrainingConfig

# Batches per pool that length grouping sorts: large enough that most batches hold rows of
# nearly one length, small enough that a batch's rows still come from across the epoch.
GROUPING_POOL_BATCHES = 16


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, order: random.Random
) -> list[list[int]]:
    """One epoch's batches as lists of example indices, grouped by length.

    The indices are shuffled, cut into pools of ``GROUPING_POOL_BATCHES`` batches, each pool
    sorted by length (longest first) and cut into batches; the batches are then shuffled.
    Every example is in exactly one batch, and there are as many batches as plain batching
    makes (only the epoch's last pool can end in a short batch)."""
    indices = list(range(len(lengths)))
    order.shuffle(indices)
    pool_size = batch_size * GROUPING_POOL_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(indices), pool_size):
        pool = sorted(indices[start : start + pool_size], key=lambda i: -lengths[i])
        batches.extend(pool[i : i + batch_size] for i in range(0, len(pool), batch_size))
    order.shuffle(batches)
    return batches


# Length grouping only for datasets of at least this many pools. A dataset that fits in one
# pool is sorted whole, so every epoch trains on the same batches in a new order; at N = 50
# and 100 that cost 2.2 BLEU on average against a plain shuffle, paired over four seeds each
# (docs/BENCHMARKS.md, "Length grouping and quality"). From two pools up, which rows share a
# pool changes every epoch.
GROUPING_MIN_POOLS = 2


def min_grouped_examples(batch_size: int) -> int:
    """The smallest dataset that :func:`epoch_batches` groups by length (256 at batch 8)."""
    return GROUPING_MIN_POOLS * GROUPING_POOL_BATCHES * batch_size


def epoch_batches(
    lengths: Sequence[int], batch_size: int, order: random.Random, *, group_by_length: bool
) -> list[list[int]]:
    """One epoch's batches: length-grouped when asked and the dataset has at least
    :func:`min_grouped_examples`, a plain shuffle otherwise."""
    if group_by_length and len(lengths) >= min_grouped_examples(batch_size):
        return length_grouped_batches(lengths, batch_size, order)
    return shuffled_batches(len(lengths), batch_size, order)


def shuffled_batches(count: int, batch_size: int, order: random.Random) -> list[list[int]]:
    """One epoch's batches as lists of example indices: a plain shuffle."""
    indices = list(range(count))
    order.shuffle(indices)
    return [indices[i : i + batch_size] for i in range(0, count, batch_size)]


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX), where
    oneDNN runs them about twice as fast as float32; elsewhere bfloat16 is emulated and slower."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolved_compute_dtype(model: PreTrainedModel, compute_dtype: str) -> str:
    """``float32`` or ``bfloat16``: what the frozen model's matrix products run in on a CPU
    (``auto``: bfloat16 where the CPU has it natively). A model not on the CPU runs in its
    own dtype, whatever this says."""
    if compute_dtype == "auto":
        native = model.device.type == "cpu" and cpu_has_native_bfloat16()
        return "bfloat16" if native else "float32"
    return compute_dtype


def compute_precision(
    model: PreTrainedModel, compute_dtype: str
) -> contextlib.AbstractContextManager[Any]:
    """The context the frozen model's training forward runs in: bfloat16 autocast on a CPU
    model when :func:`resolved_compute_dtype` says so (its backward follows the forward's
    dtypes), else nothing. Autocast leaves softmax, normalization and the loss in float32."""
    if model.device.type == "cpu" and resolved_compute_dtype(model, compute_dtype) == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: int
    loss: float
    validation_loss: float | None
    tokens_per_second: float
    elapsed_seconds: float


@dataclass
class TrainingResult:
    prefix: Prefix
    history: list[Progress] = field(default_factory=list)


def _prefix_inputs(key_values: torch.Tensor, batch: Batch, config: Any) -> dict[str, Any]:
    batch_size, length = batch.input_ids.shape
    prefix_length, device = key_values.shape[-2], key_values.device
    attention_mask = torch.cat(
        [torch.ones((batch_size, prefix_length), dtype=torch.long), batch.attention_mask], dim=1
    )  # (B, P + T)
    position_ids = torch.arange(prefix_length, prefix_length + length).expand(batch_size, -1)
    return dict(
        input_ids=batch.input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        past_key_values=prefix_cache(key_values, config),
        use_cache=True,
    )


def prefix_logits(model: PreTrainedModel, key_values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Logits ``(B, T, vocab)`` of a right-padded batch behind a prefix
    ``key_values`` ``(layers, 2, B, kv_heads, P, head_dim)``: real tokens sit at positions
    ``P …``, and the attention mask covers the ``P`` prefix slots. Encoder-decoder models:
    the decoder's logits ``(B, Td, vocab)`` (:func:`common.encoder_decoder.seq2seq_logits`)."""
    key_values = key_values.to(device=model.device, dtype=model.dtype)  # e.g. bfloat16 on a GPU
    if is_encoder_decoder(model.config):
        return prefix_seq2seq_logits(model, key_values, batch)
    return model(**_prefix_inputs(key_values, batch, model.config)).logits


def output_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Loss of full logits ``(B, T, vocab)`` against ``labels`` ``(B, T)``."""
    labels = labels.to(logits.device)
    token_losses = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)  # (B, T), zero where no loss
    if reduction == "sequence_sum":
        return token_losses.sum(dim=1).mean()
    return token_losses.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


def prefix_output_loss(
    model: PreTrainedModel, key_values: torch.Tensor, batch: Batch, reduction: str
) -> torch.Tensor:
    """The training loss, equal to ``output_loss(prefix_logits(...))`` but cheaper: the
    output projection (vocabulary-sized, ~20% of a small model's compute) runs only at the
    positions that carry a loss — output tokens — not at input or padding positions.

    Encoder-decoder models: every decoder position but padding carries a loss, so the full
    logits are computed (and BART's logit bias and T5's output scaling stay the model's)."""
    if is_encoder_decoder(model.config):
        return output_loss(prefix_logits(model, key_values, batch), batch.labels, reduction)
    key_values = key_values.to(device=model.device, dtype=model.dtype)  # e.g. bfloat16 on a GPU
    hidden = model.base_model(**_prefix_inputs(key_values, batch, model.config)).last_hidden_state
    labels = batch.labels.to(hidden.device)
    has_loss = labels != IGNORE_INDEX  # (B, T)
    logits = model.get_output_embeddings()(hidden[has_loss])  # (N, vocab), N output tokens
    token_losses = F.cross_entropy(logits.float(), labels[has_loss], reduction="none")  # (N,)
    if reduction == "sequence_sum":
        rows = has_loss.nonzero()[:, 0]  # batch row of each output token
        per_row = torch.zeros(
            len(labels), dtype=token_losses.dtype, device=labels.device
        ).index_add(0, rows, token_losses)
        return per_row.mean()
    return token_losses.mean()


@torch.no_grad()
def evaluate_loss(
    model: PreTrainedModel,
    prefix: torch.Tensor,
    examples: Sequence[EncodedExample],
    *,
    batch_size: int,
    pad_id: int,
) -> float:
    """Mean loss per output token of ``examples`` under ``prefix`` ``(layers, 2, kv, P, hs)``."""
    total, tokens = 0.0, 0
    start_id = decoder_start_id(model.config)
    for start in range(0, len(examples), batch_size):
        batch = collate(
            examples[start : start + batch_size], pad_id=pad_id, decoder_start_id=start_id
        )
        loss = prefix_output_loss(
            model, expand_prefix(prefix, len(batch.labels)), batch, "token_mean"
        )
        total += float(loss) * batch.target_tokens
        tokens += batch.target_tokens
    return total / max(tokens, 1)


def _checked_base(
    shape: PrefixShape, config: TrainingConfig, base: torch.Tensor | None, base_mode: str | None
) -> torch.Tensor | None:
    """The base prefix as float32 ``(layers, 2, kv_heads, P_base, head_dim)``, checked."""
    if (base is None) != (base_mode is None):
        raise InvalidInputError(
            "a base prefix needs a base mode and a base mode needs a base prefix; got "
            f"base {'given' if base is not None else 'none'} and base mode {base_mode!r}"
        )
    if base is None:
        return None
    if base_mode not in BASE_MODES:
        raise InvalidInputError(
            f"base mode must be one of {', '.join(BASE_MODES)}, got {base_mode!r}"
        )
    if base.dim() != 5 or base.shape[3] < 1:
        raise InvalidInputError(
            "a base prefix must have shape (layers, 2, kv_heads, P, head_dim) with P ≥ 1, "
            f"got {tuple(base.shape)}"
        )
    expected = shape.tensor_shape(base.shape[3])
    if tuple(base.shape) != expected:
        raise InvalidInputError(
            f"the base prefix does not fit the model: expected shape {expected}, got "
            f"{tuple(base.shape)}"
        )
    if base_mode == "warm_start" and config.init != "random":
        raise InvalidInputError(
            f"init {config.init!r} and a warm start from a base prefix both choose where the "
            "prefix starts; give one of them"
        )
    if not bool(torch.isfinite(base).all()):
        raise InvalidInputError("the base prefix holds values that are not finite")
    return base.detach().float()


def train_prefix(
    loaded: LoadedModel,
    examples: Sequence[Example],
    config: TrainingConfig,
    *,
    validation: Sequence[Example] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    base: torch.Tensor | None = None,
    base_mode: BaseMode | None = None,
    base_prefix_id: str | None = None,
) -> TrainingResult:
    """Train a prefix on ``examples``; return it materialized (no ``P'``, no MLP).

    ``on_progress`` is called after every optimizer step; ``should_stop`` is polled between
    steps (cancellation) and ends training early with the prefix trained so far.

    ``base`` (a base prefix's key/values ``(layers, 2, kv_heads, P_base, head_dim)``) with
    ``base_mode`` (:mod:`common.base_prefix`): ``"warm_start"`` starts the prefix exactly at
    the base (its length becomes ``P_base``); ``"stack"`` keeps the base frozen before the
    trained part, ``stack_prefixes(base, tenant)``, in every forward, and returns only the
    tenant's part. The returned prefix records ``base_prefix_id``, the base's fingerprint
    and the mode."""
    config.validate()
    model, tokenizer = loaded.model, loaded.tokenizer
    frozen = _checked_base(prefix_shape(model.config), config, base, base_mode)
    torch.manual_seed(config.seed)  # the prefix encoder's initialization
    encoder: PrefixEncoder
    if frozen is not None and base_mode == "warm_start":
        encoder = PrefixEncoder(
            prefix_shape(model.config),
            frozen.shape[3],
            mid_dim=config.mid_dim,
            reparameterize=config.reparameterize,
            offset=frozen,
        ).to(model.device)
    else:
        encoder = build_prefix_encoder(
            model,
            tokenizer,
            init=config.init,
            prefix_length=config.prefix_length,
            mid_dim=config.mid_dim,
            reparameterize=config.reparameterize,
        )
    stacked_base = frozen if base_mode == "stack" else None

    def full_prefix(tenant: torch.Tensor) -> torch.Tensor:
        """What the model sees: the tenant's prefix, behind the frozen base when stacking."""
        if stacked_base is None:
            return tenant
        return stack_prefixes(stacked_base.to(tenant.device), tenant)  # (…, P_b + P_t, hs)

    prefix_length = encoder.prefix_length
    seen_length = prefix_length + (0 if stacked_base is None else stacked_base.shape[3])
    limit = max_positions(model.config) - seen_length
    two_sided = is_encoder_decoder(model.config)
    start_id = decoder_start_id(model.config)
    if limit < 2:
        raise InvalidInputError(
            f"prefix length {seen_length} leaves {max(limit, 0)} of the model's "
            f"{max_positions(model.config)} context positions; at least 2 are needed"
        )
    train_set = encode_examples(
        tokenizer, examples, max_tokens=limit, source="training data", encoder_decoder=two_sided
    )
    dev_set = []
    if validation:
        dev_set = encode_examples(
            tokenizer,
            validation,
            max_tokens=limit,
            source="validation data",
            encoder_decoder=two_sided,
        )
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    budget = plan_budget(
        len(train_set),
        config.batch_size,
        epochs=config.epochs,
        has_validation=bool(dev_set),
        patience=config.patience,
    )
    total_steps = budget.total_steps
    optimizer = torch.optim.AdamW(
        encoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    order = random.Random(config.seed)
    history: list[Progress] = []
    best: tuple[float, int, torch.Tensor] | None = None  # (loss, step, prefix)
    validations_without_improvement, step, tokens_seen = 0, 0, 0
    started = time.perf_counter()
    evaluating_seconds = 0.0
    stopped = validation_stopped = False
    epoch = 0
    lengths = [len(example) for example in train_set]
    while step < total_steps and not (stopped or validation_stopped):
        epoch += 1
        batches = epoch_batches(
            lengths, config.batch_size, order, group_by_length=config.group_by_length
        )
        for position, rows in enumerate(batches):
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = collate([train_set[i] for i in rows], pad_id=pad_id, decoder_start_id=start_id)
            key_values = expand_prefix(
                full_prefix(encoder()), len(batch.labels)
            )  # (layers, 2, B, kv, P, hs), float32: the MLP stays outside autocast
            with compute_precision(model, config.compute_dtype):
                loss = prefix_output_loss(model, key_values, batch, config.loss_reduction)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            tokens_seen += batch.tokens
            end_of_epoch = position == len(batches) - 1
            if budget.evaluate_every is None:
                evaluate_now = end_of_epoch
            else:
                evaluate_now = step % budget.evaluate_every == 0 or step == total_steps
            validation_loss = None
            if dev_set and evaluate_now:
                evaluation_started = time.perf_counter()
                current = encoder.materialize()
                validation_loss = evaluate_loss(
                    model,
                    full_prefix(current),
                    dev_set,
                    batch_size=config.batch_size,
                    pad_id=pad_id,
                )
                evaluating_seconds += time.perf_counter() - evaluation_started
                if best is None or validation_loss < best[0]:
                    best = (validation_loss, step, current)
                    validations_without_improvement = 0
                else:
                    validations_without_improvement += 1
                    if budget.patience is not None:
                        validation_stopped = validations_without_improvement >= budget.patience
            elapsed = time.perf_counter() - started
            training_seconds = elapsed - evaluating_seconds  # tokens/s of training alone
            report = Progress(
                step,
                total_steps,
                epoch,
                float(loss.detach()),
                validation_loss,
                tokens_seen / max(training_seconds, 1e-9),
                elapsed,
            )
            history.append(report)
            if on_progress is not None:
                on_progress(report)
            if validation_stopped or step >= total_steps:
                break

    key_values = best[2] if best is not None else encoder.materialize()
    metrics: dict[str, float | int | bool] = {
        "steps": step,
        "planned_steps": total_steps,
        "automatic_budget": budget.automatic,
        "early_stopped": validation_stopped,
        "train_loss": history[-1].loss if history else float("nan"),
        "tokens_per_second": history[-1].tokens_per_second if history else 0.0,
        "examples": len(train_set),
        "stopped_early": stopped,
    }
    if best is not None:
        metrics["validation_loss"] = best[0]
        metrics["best_step"] = best[1]
        metrics["validation_examples"] = len(dev_set)
    hyperparameters = asdict(config) | {
        "prefix_length": prefix_length,
        "compute_dtype": resolved_compute_dtype(model, config.compute_dtype),  # what ran
    }
    prefix = Prefix(
        key_values=key_values.to(getattr(torch, config.dtype)),
        base_model_fingerprint=loaded.fingerprint,
        architecture=loaded.architecture,
        prompt_format=prompt_format(model.config),
        hyperparameters=hyperparameters,
        metrics=metrics,
        sections=prefix_shape(model.config).sections,
        base_prefix_id=base_prefix_id if base is not None else None,
        base_fingerprint=key_values_fingerprint(base) if base is not None else None,
        base_mode=base_mode,
    )
    return TrainingResult(prefix, history)
