"""Encoder-decoder training throughput: our prefix-tuning vs Hugging Face PEFT's, on a small
random BART (the paper's summarization setting uses BART).

A BART built from a config (random weights: throughput does not depend on them) with a
word-level vocabulary made from the E2E examples, saved as an ordinary model directory and
loaded through ``common.model_loading`` like any base model. Both sides train a length-10
prefix with a 512-wide reparameterization MLP on the same E2E batches (same collation, loss
on the decoder's output tokens, AdamW, same learning rate); rounds alternate so load from
other processes hits every side alike. The figure that matters is the ratio of real tokens/s
(encoder plus decoder tokens, counted the same way for every side).

Like for like: PEFT's ``SEQ_2_SEQ_LM`` prefix tuning prefixes only the decoder's
self-attention (it drops the cross-attention prefix it builds and gives the encoder none),
so the compared prefixd side trains exactly that prefix — a
:class:`~common.prefix_encoder.PrefixEncoder` over the decoder's layers, through
:func:`common.encoder_decoder.seq2seq_logits` with no encoder or cross-attention prefix —
with ``train_prefix``'s step otherwise (length-grouped batches, its compute precision, loss,
clipping, AdamW). A third side, ``train_prefix`` itself with the paper's three prefixes
(encoder, decoder, cross-attention; back-propagation through the encoder), is shown for
reference, not compared.

    .venv/bin/python -m bench.seq2seq_smoke [--steps 8] [--rounds 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

from bench.report import write_section
from bench.train_throughput import LEARNING_RATE, MID_DIM, PREFIX_LENGTH, ours, peft
from common.architectures import PrefixShape, decoder_start_id, max_positions, prefix_shape
from common.config import get_settings
from common.data import EncodedExample, Example, collate, encode_examples
from common.datasets.e2e import low_data_split, read_e2e
from common.encoder_decoder import seq2seq_logits
from common.kv_cache import expand_prefix
from common.model_loading import LoadedModel, load_model
from common.prefix_encoder import PrefixEncoder
from common.training import (
    compute_precision,
    length_grouped_batches,
    output_loss,
    resolved_compute_dtype,
)
from common.training_config import TrainingConfig

D_MODEL, LAYERS, HEADS, FFN = 256, 3, 4, 1024


def build_bart(directory: Path, examples: Sequence[Example]) -> Path:
    """A random BART with a word-level vocabulary covering ``examples``, saved as a model
    directory (weights, config, tokenizer)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = sorted({w for e in examples for w in f"{e.input} {e.output}".split()})
    backend = Tokenizer(
        WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def peft_step_fn(loaded: LoadedModel) -> Callable[[Sequence[EncodedExample]], int]:
    """A PEFT ``SEQ_2_SEQ_LM`` prefix-tuning step on a copy of the model (PEFT wraps it)."""
    model = get_peft_model(
        copy.deepcopy(loaded.model),
        PrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM",
            num_virtual_tokens=PREFIX_LENGTH,
            prefix_projection=True,
            encoder_hidden_size=MID_DIM,
        ),
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE
    )
    pad, start = int(loaded.tokenizer.pad_token_id), decoder_start_id(loaded.model.config)

    def step(encoded: Sequence[EncodedExample]) -> int:
        batch = collate(encoded, pad_id=pad, decoder_start_id=start)
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            decoder_input_ids=batch.decoder_input_ids,
            decoder_attention_mask=batch.decoder_attention_mask,
        ).logits
        loss = output_loss(logits, batch.labels, "token_mean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return batch.tokens

    return step


def decoder_prefix_trainer(
    loaded: LoadedModel, seed: int
) -> Callable[[Sequence[EncodedExample]], int]:
    """prefixd's training step restricted to PEFT's prefix positions: only the decoder's
    self-attention prefix ``(decoder layers, 2, kv, P, hs)`` trains (no encoder or
    cross-attention prefix), otherwise as ``common.training.train_prefix`` steps."""
    model, defaults = loaded.model, TrainingConfig()
    shape = prefix_shape(model.config)
    decoder_layers = shape.section("decoder")
    torch.manual_seed(seed)
    encoder = PrefixEncoder(
        PrefixShape(decoder_layers.stop - decoder_layers.start, shape.kv_heads, shape.head_dim),
        PREFIX_LENGTH,
        mid_dim=MID_DIM,
    )
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=LEARNING_RATE)
    pad, start = int(loaded.tokenizer.pad_token_id), decoder_start_id(model.config)

    def step(encoded: Sequence[EncodedExample]) -> int:
        batch = collate(encoded, pad_id=pad, decoder_start_id=start)
        key_values = expand_prefix(encoder(), len(encoded))  # (Ld, 2, B, kv, P, hs)
        with compute_precision(model, defaults.compute_dtype):
            logits = seq2seq_logits(
                model, batch, encoder_prefix=None, decoder_prefix=key_values, cross_prefix=None
            )
            loss = output_loss(logits, batch.labels, defaults.loss_reduction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), defaults.max_grad_norm)
        optimizer.step()
        return batch.tokens

    return step


def ours_decoder_prefix(
    loaded: LoadedModel, encoded: Sequence[EncodedExample], batch_size: int, steps: int, seed: int
) -> float:
    """tokens/s of :func:`decoder_prefix_trainer` on length-grouped batches of ``encoded``."""
    step = decoder_prefix_trainer(loaded, seed)
    lengths = [len(e) for e in encoded[: steps * batch_size]]
    batches = length_grouped_batches(lengths, batch_size, random.Random(seed))
    tokens, started = 0, time.perf_counter()
    for rows in batches[:steps]:
        tokens += step([encoded[i] for i in rows])
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per round and side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    split = low_data_split(read_e2e(), n_train=args.steps * args.batch_size, n_test=1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(
            str(build_bart(Path(tmp) / "bart", split.train)), settings=get_settings()
        )
    encoded = encode_examples(
        loaded.tokenizer,
        split.train,
        encoder_decoder=True,
        max_tokens=max_positions(loaded.model.config) - PREFIX_LENGTH,
    )
    peft_step = peft_step_fn(loaded)
    # Warm-up: first calls pay for allocator growth and lazy initialization.
    ours(loaded, split.train, args.batch_size, 1, seed=0)
    peft(peft_step, encoded, args.batch_size, 1)
    ours_decoder_prefix(loaded, encoded, args.batch_size, 1, seed=0)

    results: dict[str, list[float]] = {"prefixd": [], "PEFT": [], "prefixd three prefixes": []}
    for round_ in range(args.rounds):
        results["prefixd"].append(
            ours_decoder_prefix(loaded, encoded, args.batch_size, args.steps, round_)
        )
        results["PEFT"].append(peft(peft_step, encoded, args.batch_size, args.steps))
        results["prefixd three prefixes"].append(
            ours(loaded, split.train, args.batch_size, args.steps, round_)
        )
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()))

    ratios = [a / b for a, b in zip(results["prefixd"], results["PEFT"], strict=True)]
    three = [a / b for a, b in zip(results["prefixd three prefixes"], results["PEFT"], strict=True)]
    compute = resolved_compute_dtype(loaded.model, "auto")
    median = {name: statistics.median(values) for name, values in results.items()}
    parameters = sum(p.numel() for p in loaded.model.parameters())
    body = f"""Encoder-decoder prefix-tuning training throughput on a random BART built from a
config ({LAYERS}+{LAYERS} layers, d_model {D_MODEL}, {HEADS} heads, {parameters / 1e6:.1f}M
parameters, word-level vocabulary of the E2E examples; prefix length {PREFIX_LENGTH}, MLP
{MID_DIM}, batch {args.batch_size}, {args.threads} torch thread(s)): {args.rounds} alternating
rounds of {args.steps} optimizer steps per side on the same {len(encoded)} E2E examples;
tokens = real encoder + decoder tokens.

| side | prefixes trained | batches, compute | tokens/s per round | median |
|---|---|---|---|---|
| prefixd, like for like (`bench.seq2seq_smoke.decoder_prefix_trainer`) | decoder self-attention | grouped by length, {compute} autocast | {", ".join(f"{v:.0f}" for v in results["prefixd"])} | {median["prefixd"]:.0f} |
| Hugging Face PEFT prefix tuning, `SEQ_2_SEQ_LM` | decoder self-attention | in order, float32 | {", ".join(f"{v:.0f}" for v in results["PEFT"])} | {median["PEFT"]:.0f} |
| reference: prefixd `train_prefix` as shipped | encoder + decoder + cross-attention | grouped by length, {compute} autocast | {", ".join(f"{v:.0f}" for v in results["prefixd three prefixes"])} | {median["prefixd three prefixes"]:.0f} |

**Like for like, prefixd / PEFT: {statistics.median(ratios):.2f}×** (per round: {", ".join(f"{r:.2f}" for r in ratios)}; target ≥ 1.0: {"met" if statistics.median(ratios) >= 1.0 else "missed"}).
Reference, three prefixes / PEFT's one: {statistics.median(three):.2f}× (per round: {", ".join(f"{r:.2f}" for r in three)}; not the same work).

What is compared: PEFT's `SEQ_2_SEQ_LM` prefix tuning trains only the decoder's
self-attention prefix, so the like-for-like prefixd side trains only that one too, through
the same code `train_prefix` runs (`PrefixEncoder`, `common.encoder_decoder.seq2seq_logits`
with no encoder or cross-attention prefix, `common.training.compute_precision`, the
token-mean loss on decoder tokens, clipping, AdamW) on length-grouped batches; PEFT takes the
same examples in order, in float32. `train_prefix` as shipped trains the paper's three
prefixes (`[PREFIX; x; PREFIX'; y]`): the encoder's prefix makes every step back-propagate
through the whole encoder and its MLP produces three sets of layers, which is the reference
row's extra cost. The decoder-only loop's saving (the output projection only at output
positions) does not apply: every decoder position but padding carries a loss. On a shared
machine, read the per-round spread as the noise level.

Reproduce: `.venv/bin/python -m bench.seq2seq_smoke --steps {args.steps} --rounds {args.rounds} --batch-size {args.batch_size} --threads {args.threads}`
"""
    print(body)
    if not args.no_write:
        print(
            "wrote",
            write_section("Encoder-decoder training throughput (bench/seq2seq_smoke.py)", body),
        )


if __name__ == "__main__":
    main()
