"""Encoder-decoder training throughput: our prefix-tuning vs Hugging Face PEFT's, on a small
random BART (the paper's summarization setting uses BART).

A BART built from a config (random weights: throughput does not depend on them) with a
word-level vocabulary made from the E2E examples, saved as an ordinary model directory and
loaded through ``common.model_loading`` like any base model. Both sides train a length-10
prefix with a 512-wide reparameterization MLP on the same E2E batches (same collation, loss
on the decoder's output tokens, AdamW, same learning rate); rounds alternate so load from
other processes hits both alike. The figure that matters is the ratio of tokens/s (encoder
plus decoder tokens, counted the same way for both sides).

Not the same work: prefixd prefixes the encoder's self-attention, the decoder's
self-attention and the cross-attention (the paper's method); PEFT's ``SEQ_2_SEQ_LM`` prefix
tuning only the decoder's self-attention (it drops the cross-attention prefix it builds and
gives the encoder none), so PEFT never back-propagates through the encoder.

    .venv/bin/python -m bench.seq2seq_smoke [--steps 8] [--rounds 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
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
from common.architectures import decoder_start_id, max_positions
from common.config import get_settings
from common.data import EncodedExample, Example, collate, encode_examples
from common.datasets.e2e import low_data_split, read_e2e
from common.model_loading import LoadedModel, load_model
from common.training import output_loss

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

    results: dict[str, list[float]] = {"prefixd": [], "PEFT": []}
    for round_ in range(args.rounds):
        results["prefixd"].append(ours(loaded, split.train, args.batch_size, args.steps, round_))
        results["PEFT"].append(peft(peft_step, encoded, args.batch_size, args.steps))
        print(
            f"round {round_ + 1}: prefixd {results['prefixd'][-1]:.0f} tok/s, "
            f"PEFT {results['PEFT'][-1]:.0f} tok/s"
        )

    ratios = [a / b for a, b in zip(results["prefixd"], results["PEFT"], strict=True)]
    median = {name: statistics.median(values) for name, values in results.items()}
    parameters = sum(p.numel() for p in loaded.model.parameters())
    body = f"""Encoder-decoder prefix-tuning training throughput on a random BART built from a
config ({LAYERS}+{LAYERS} layers, d_model {D_MODEL}, {HEADS} heads, {parameters / 1e6:.1f}M
parameters, word-level vocabulary of the E2E examples; prefix length {PREFIX_LENGTH}, MLP
{MID_DIM}, batch {args.batch_size}, {args.threads} torch thread(s)): {args.rounds} alternating
rounds of {args.steps} optimizer steps per side, tokens = encoder + decoder tokens.

| side | tokens/s per round | median |
|---|---|---|
| prefixd (`common.training.train_prefix`: encoder, decoder and cross-attention prefixes) | {", ".join(f"{v:.0f}" for v in results["prefixd"])} | {median["prefixd"]:.0f} |
| Hugging Face PEFT prefix tuning, `SEQ_2_SEQ_LM` (decoder self-attention prefix only) | {", ".join(f"{v:.0f}" for v in results["PEFT"])} | {median["PEFT"]:.0f} |

**Ratio prefixd / PEFT: {statistics.median(ratios):.2f}×** (per round: {", ".join(f"{r:.2f}" for r in ratios)}).

A smoke benchmark, not a like-for-like race: the two sides do different work. prefixd trains
the paper's three prefixes (`[PREFIX; x; PREFIX'; y]`): the encoder's prefix makes every step
back-propagate through the whole encoder, and its MLP produces 3 sets of layers (encoder,
decoder, cross) where PEFT's produces one; PEFT's `SEQ_2_SEQ_LM` prefix tuning trains only the
decoder's self-attention prefix, so its backward pass never enters the encoder (the
known gap the design names); by an ad-hoc timing on this model, that backward pass is most
of the difference. The decoder-only loop's saving (the output projection only at output positions) does not apply:
every decoder position but padding carries a loss. On a shared machine, read the per-round
spread as the noise level.

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
