"""E2E low-data quality: our prefix-tuning vs Hugging Face PEFT's vs full fine-tuning.

The paper's low-data protocol (Li & Liang 2021) on the embedded model: for each
training-set size N and seed, :func:`common.datasets.e2e.low_data_split` holds out
``--test-mrs`` E2E meaning representations (MRs), samples N training pairs and a dev slice of
30% of N from the other MRs, and every method trains on exactly those examples:

    prefix-random  common.training.train_prefix, random init
    prefix-text    common.training.train_prefix, init from the activations of "table-to-text:"
    peft-prefix    Hugging Face PEFT prefix tuning (10 virtual tokens, 512-wide projection)
    finetune       full fine-tuning, all weights trainable, on a copy of the model

All share the data format (:func:`common.data.collate`: ``input <sep> output <eos>``, loss on
output tokens), batches (same seeded order), optimizer (AdamW), schedule (linear warmup then
decay), gradient clipping and epochs; the epoch with the best dev loss is kept. The only
per-method knob is the learning rate (``--lr-prefix`` for the three prefix rows,
``--lr-finetune`` for fine-tuning). PEFT's trained prefix is materialized into our
``(layers, 2, kv_heads, P, head_dim)`` layout, so every row decodes through the same
:func:`common.generation.generate_texts`: one output per held-out MR, beam search with 5
beams. The score is multi-reference corpus BLEU (sacrebleu, all references of each MR).

The table (N, method, BLEU per seed, mean ± std, train tokens/s, wall time) is printed and
written into the ``E2E low-data quality`` section of docs/BENCHMARKS.md, with a plot of BLEU
vs N at docs/img/e2e_quality.png. Train tokens/s counts real (unpadded) tokens over the whole
training call, per-epoch dev evaluation included, the same way for every method.

Reproduce (from the repository root; at N=50 about 15 min per seed on 2 idle cores, training
time grows with N; ``--threads 1`` is much faster when other processes share the cores):

    .venv/bin/python -m bench.e2e_quality --n 50 --seeds 2 --test-mrs 40 --epochs 5 --threads 1
    .venv/bin/python -m bench.e2e_quality --quick     # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sacrebleu
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from bench.report import BENCHMARKS, write_section
from common.architectures import max_positions, prefix_shape
from common.config import Settings
from common.data import Batch, EncodedExample, Example, collate, encode_examples
from common.datasets.e2e import LowDataSplit, MeaningRepresentation, low_data_split, read_e2e
from common.generation import DecodingConfig, generate_texts
from common.kv_cache import expand_prefix
from common.model_loading import LoadedModel, load_model
from common.prefix_file import Prefix
from common.training import (
    Progress,
    TrainingConfig,
    output_loss,
    prefix_logits,
    train_prefix,
)

TITLE = "E2E low-data quality (bench/e2e_quality.py)"
METHODS = ("prefix-random", "prefix-text", "peft-prefix", "finetune")
TEXT_INIT = "text:table-to-text:"
PLOT = BENCHMARKS.parent / "img" / "e2e_quality.png"
NUM_BEAMS = 5  # as the paper


@dataclass
class Run:
    """One method trained and evaluated on one (N, seed) split."""

    n: int
    seed: int
    method: str
    bleu: float
    tokens_per_second: float
    train_seconds: float
    decode_seconds: float
    best_epoch: int
    samples: list[tuple[str, str]] = field(default_factory=list)  # (MR, output), a few


@dataclass
class Trained:
    """What a method hands to evaluation: the model to decode with and its prefix (or None)."""

    loaded: LoadedModel
    prefix: Prefix | None
    best_epoch: int


def training_config(args: argparse.Namespace, seed: int, *, init: str = "random") -> TrainingConfig:
    return TrainingConfig(
        init=init, epochs=args.epochs, learning_rate=args.lr_prefix, batch_size=args.batch_size,
        warmup_ratio=args.warmup_ratio, seed=seed, loss_reduction="token_mean",
    )  # fmt: skip


def real_tokens(encoded: Sequence[EncodedExample], epochs: int) -> int:
    return epochs * sum(len(e) for e in encoded)


# --- ours --------------------------------------------------------------------------------


def train_ours(
    loaded: LoadedModel, train: list[Example], dev: list[Example], config: TrainingConfig
) -> Trained:
    steps = math.ceil(len(train) / config.batch_size) * config.epochs
    with tqdm(total=steps, desc=f"  train {config.init}", leave=False, unit="step") as bar:

        def report(progress: Progress) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{progress.loss:.3f}")

        result = train_prefix(loaded, train, config, validation=dev, on_progress=report)
    validation = [
        (p.validation_loss, p.epoch) for p in result.history if p.validation_loss is not None
    ]
    best_epoch = min(validation)[1] if validation else config.epochs
    return Trained(loaded, result.prefix, best_epoch)


# --- baselines: one plain loop, the same batches, optimizer and schedule as train_prefix ---


def plain_loop(
    parameters: list[torch.nn.Parameter],
    logits_of: Callable[[Batch], torch.Tensor],
    train_set: list[EncodedExample],
    dev_set: list[EncodedExample],
    config: TrainingConfig,
    *,
    pad_id: int,
    snapshot: Callable[[], object],
    desc: str,
) -> tuple[object, int]:
    """Train ``parameters`` the way :func:`common.training.train_prefix` trains a prefix
    (seeded shuffle, AdamW, linear warmup/decay, clipping, token-mean loss on output tokens);
    return the ``snapshot()`` taken after the epoch with the best dev loss, and that epoch."""
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    order = random.Random(config.seed)
    best: tuple[float, int, object] | None = None
    with tqdm(total=total_steps, desc=f"  train {desc}", leave=False, unit="step") as bar:
        for epoch in range(1, config.epochs + 1):
            indices = list(range(len(train_set)))
            order.shuffle(indices)
            for start in range(0, len(indices), config.batch_size):
                chosen = indices[start : start + config.batch_size]
                batch = collate([train_set[i] for i in chosen], pad_id=pad_id)
                loss = output_loss(logits_of(batch), batch.labels, config.loss_reduction)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            dev_loss = mean_loss(logits_of, dev_set, batch_size=config.batch_size, pad_id=pad_id)
            if best is None or dev_loss < best[0]:
                best = (dev_loss, epoch, snapshot())
    assert best is not None
    return best[2], best[1]


@torch.no_grad()
def mean_loss(
    logits_of: Callable[[Batch], torch.Tensor],
    examples: Sequence[EncodedExample],
    *,
    batch_size: int,
    pad_id: int,
) -> float:
    """Mean loss per output token (as :func:`common.training.evaluate_loss`, for any model)."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id=pad_id)
        total += (
            float(output_loss(logits_of(batch), batch.labels, "token_mean")) * batch.target_tokens
        )
        tokens += batch.target_tokens
    return total / max(tokens, 1)


def encode(
    loaded: LoadedModel, examples: Sequence[Example], prefix_length: int
) -> list[EncodedExample]:
    limit = max_positions(loaded.model.config) - prefix_length
    return encode_examples(loaded.tokenizer, examples, max_tokens=limit)


def pad_id_of(loaded: LoadedModel) -> int:
    tokenizer = loaded.tokenizer
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def train_peft(
    loaded: LoadedModel, train: list[Example], dev: list[Example], config: TrainingConfig
) -> Trained:
    """PEFT prefix tuning with our batches, loss and schedule; its prefix materialized into
    our layout so decoding is the same code as for our prefixes."""
    torch.manual_seed(config.seed)
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=config.prefix_length,
        prefix_projection=True, encoder_hidden_size=config.mid_dim,
    )  # fmt: skip
    # PEFT wraps the model it is given; a copy keeps the shared frozen model untouched.
    model = get_peft_model(copy.deepcopy(loaded.model), peft_config)
    materialize = torch.no_grad()(lambda: peft_key_values(model, loaded, config.prefix_length))

    def logits_of(batch: Batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    pad_id = pad_id_of(loaded)
    train_set = encode(loaded, train, config.prefix_length)
    dev_set = encode(loaded, dev, config.prefix_length)
    parameters = [p for p in model.parameters() if p.requires_grad]
    key_values, best_epoch = plain_loop(
        parameters, logits_of, train_set, dev_set, config,
        pad_id=pad_id, snapshot=materialize, desc="peft",
    )  # fmt: skip
    assert isinstance(key_values, torch.Tensor)
    check_layout(loaded, model, dev_set[: config.batch_size], config.prefix_length, pad_id)
    prefix = Prefix(key_values, loaded.fingerprint, loaded.architecture)
    return Trained(loaded, prefix, best_epoch)


def peft_key_values(peft_model: PeftModel, loaded: LoadedModel, length: int) -> torch.Tensor:
    """PEFT's prefix in our layout ``(layers, 2, kv_heads, P, head_dim)``: its encoder output
    ``(P, layers·2·kv_heads·hs)`` is laid out as ``(P, layers, 2, kv_heads, hs)``
    (tests/common/test_peft_equivalence.py proves it)."""
    s = prefix_shape(loaded.model.config)
    tokens = peft_model.prompt_tokens["default"][:length].unsqueeze(0)  # (1, P)
    flat = peft_model.prompt_encoder["default"](tokens)[0]  # (P, layers·2·kv_heads·hs)
    return (
        flat.view(length, s.layers, 2, s.kv_heads, s.head_dim).permute(1, 2, 3, 0, 4).contiguous()
    )


@torch.no_grad()
def check_layout(
    loaded: LoadedModel,
    peft_model: PeftModel,
    examples: Sequence[EncodedExample],
    length: int,
    pad_id: int,
) -> None:
    """Our forward behind PEFT's prefix (as :func:`peft_key_values` lays it out) must give
    PEFT's own logits, else the PEFT row would be decoded with a scrambled prefix."""
    batch = collate(examples, pad_id=pad_id)
    key_values = expand_prefix(peft_key_values(peft_model, loaded, length), len(batch.labels))
    ours = prefix_logits(loaded.model, key_values, batch)
    theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-3, atol=1e-3)


def train_finetune(
    loaded: LoadedModel, train: list[Example], dev: list[Example], config: TrainingConfig
) -> Trained:
    """Full fine-tuning at the same budget; decoded as the bare model (no prefix)."""
    torch.manual_seed(config.seed)
    model = copy.deepcopy(loaded.model)  # the loaded model is frozen and shared: train a copy
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.train()

    def logits_of(batch: Batch) -> torch.Tensor:
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).logits

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in model.state_dict().items()}

    pad_id = pad_id_of(loaded)
    train_set, dev_set = encode(loaded, train, 0), encode(loaded, dev, 0)
    parameters = list(model.parameters())
    state, best_epoch = plain_loop(
        parameters, logits_of, train_set, dev_set, config,
        pad_id=pad_id, snapshot=snapshot, desc="finetune",
    )  # fmt: skip
    assert isinstance(state, dict)
    model.load_state_dict(state)
    del state
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    tuned = LoadedModel(model, loaded.tokenizer, loaded.fingerprint, loaded.source)
    return Trained(tuned, None, best_epoch)


# --- evaluation --------------------------------------------------------------------------


def decode(
    trained: Trained, test: Sequence[MeaningRepresentation], decoding: DecodingConfig, chunk: int
) -> list[str]:
    """One output per MR, ``chunk`` MRs (× beams rows) per call to keep memory small."""
    outputs: list[str] = []
    for start in tqdm(range(0, len(test), chunk), desc="  decode", leave=False, unit="chunk"):
        requests = [(trained.prefix, mr.mr) for mr in test[start : start + chunk]]
        outputs.extend(generate_texts(trained.loaded, requests, decoding))
    return outputs


def corpus_bleu(outputs: Sequence[str], test: Sequence[MeaningRepresentation]) -> float:
    """Multi-reference corpus BLEU: every reference of each MR (sacrebleu pads the shorter
    reference lists with None)."""
    most = max(len(mr.references) for mr in test)
    streams: list[list[str | None]] = [
        [mr.references[k] if k < len(mr.references) else None for mr in test] for k in range(most)
    ]
    return float(sacrebleu.corpus_bleu(list(outputs), streams).score)  # type: ignore[arg-type]


TRAINERS: dict[
    str, Callable[[LoadedModel, list[Example], list[Example], TrainingConfig], Trained]
] = {
    "prefix-random": train_ours,
    "prefix-text": train_ours,
    "peft-prefix": train_peft,
    "finetune": train_finetune,
}


def run_one(
    loaded: LoadedModel,
    method: str,
    n: int,
    seed: int,
    split: LowDataSplit,
    args: argparse.Namespace,
) -> Run:
    config = training_config(args, seed, init=TEXT_INIT if method == "prefix-text" else "random")
    if method == "finetune":
        config.learning_rate = args.lr_finetune
    started = time.perf_counter()
    trained = TRAINERS[method](loaded, split.train, split.dev, config)
    train_seconds = time.perf_counter() - started
    tokens = real_tokens(encode(loaded, split.train, 0), config.epochs)
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, num_beams=NUM_BEAMS)
    started = time.perf_counter()
    outputs = decode(trained, split.test, decoding, args.decode_batch)
    decode_seconds = time.perf_counter() - started
    return Run(
        n=n, seed=seed, method=method, bleu=corpus_bleu(outputs, split.test),
        tokens_per_second=tokens / train_seconds, train_seconds=train_seconds,
        decode_seconds=decode_seconds, best_epoch=trained.best_epoch,
        samples=[(mr.mr, out) for mr, out in zip(split.test[:2], outputs[:2], strict=True)],
    )  # fmt: skip


# --- report ------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{statistics.mean(values):.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(runs: Sequence[Run], seeds: Sequence[int]) -> str:
    head = ["N", "method", *(f"BLEU seed {s}" for s in seeds), "BLEU mean ± std"]
    head += ["best epoch", "train tokens/s", "wall s (train + decode)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sorted({r.n for r in runs}):
        for method in METHODS:
            rows = [r for r in runs if r.n == n and r.method == method]
            if not rows:
                continue
            by_seed = {r.seed: r for r in rows}
            cells = [str(n), method]
            cells += [f"{by_seed[s].bleu:.1f}" if s in by_seed else "—" for s in seeds]
            cells.append(mean_std([r.bleu for r in rows]))
            cells.append(", ".join(str(by_seed[s].best_epoch) for s in seeds if s in by_seed))
            cells.append(f"{statistics.mean(r.tokens_per_second for r in rows):.0f}")
            cells.append(
                f"{statistics.mean(r.train_seconds for r in rows):.0f} + "
                f"{statistics.mean(r.decode_seconds for r in rows):.0f}"
            )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(runs: Sequence[Run]) -> list[str]:
    """Per N: does each of our rows reach PEFT's and fine-tuning's mean BLEU?"""
    lines = []
    for n in sorted({r.n for r in runs}):
        means = {
            m: statistics.mean(r.bleu for r in runs if r.n == n and r.method == m)
            for m in METHODS
            if any(r.n == n and r.method == m for r in runs)
        }
        for ours in ("prefix-random", "prefix-text"):
            for other in ("peft-prefix", "finetune"):
                if ours in means and other in means:
                    gap = means[ours] - means[other]
                    mark = "≥" if gap >= 0 else "<"
                    lines.append(f"- N={n}: {ours} {mark} {other} ({gap:+.1f} BLEU)")
    return lines


def plot(runs: Sequence[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    all_ns = sorted({r.n for r in runs})
    for index, method in enumerate(METHODS):
        ns = sorted({r.n for r in runs if r.method == method})
        if not ns:
            continue
        scores = [[r.bleu for r in runs if r.method == method and r.n == n] for n in ns]
        means = [statistics.mean(s) for s in scores]
        stds = [statistics.stdev(s) if len(s) > 1 else 0.0 for s in scores]
        dodge = 1 + 0.03 * (index - (len(METHODS) - 1) / 2)  # keep error bars apart
        xs = [n * dodge for n in ns]
        axes.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    axes.set_xscale("log")
    axes.set_xlim(min(all_ns) / 1.5, max(all_ns) * 1.5)
    axes.set_xticks(all_ns, labels=[str(n) for n in all_ns])
    axes.minorticks_off()
    axes.set_xlabel("training examples N")
    axes.set_ylabel("BLEU (held-out MRs, 5 beams)")
    axes.set_title("E2E low-data: SmolLM2-135M-Instruct")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def section(
    runs: Sequence[Run], args: argparse.Namespace, seeds: Sequence[int], init_tokens: int
) -> str:
    command = shlex.join([".venv/bin/python", "-m", "bench.e2e_quality", *sys.argv[1:]])
    protocol = (
        f"The paper's low-data protocol: per N and seed, {args.test_mrs} held-out E2E MRs "
        "(never seen in training or dev), N training pairs and a dev slice of 30% of N from the "
        "other MRs (`low_data_split`; the seed picks both the split and the training seed). "
        f"Every method: {args.epochs} epochs, batch {args.batch_size}, AdamW, linear warmup "
        f"({args.warmup_ratio:.0%}) then decay, clipping 1.0, token-mean loss on output tokens, "
        f"the best dev-loss epoch kept. Learning rate {args.lr_prefix:g} for the three prefix "
        "rows (length 10, 512-wide reparameterization MLP; `prefix-text` starts from the "
        f"activations of `{TEXT_INIT.removeprefix('text:')}`, so its length is {init_tokens}), "
        f"{args.lr_finetune:g} for full fine-tuning. Every row decodes with our `generate_texts` "
        f"(PEFT's prefix materialized into our layout): {NUM_BEAMS} beams, at most "
        f"{args.max_new_tokens} new tokens, one output per MR. Score: sacrebleu corpus BLEU "
        "against all references of each MR. Train tokens/s: real tokens over the whole "
        "training call (per-epoch dev evaluation included), the same for every method; it and "
        "the seconds move with whatever else shares the cores, BLEU does not."
    )
    first = [r for r in runs if r.seed == seeds[0] and r.n == runs[0].n and r.samples]
    samples = []
    if first:
        samples = [f"Outputs for `{first[0].samples[0][0]}` (N={first[0].n}, seed {seeds[0]}):", ""]
        samples += [f"- {r.method}: {r.samples[0][1]}" for r in first]
    image = os.path.relpath(args.plot.resolve(), args.out.resolve().parent)
    parts = [
        f"Model: SmolLM2-135M-Instruct (`{args.model}`); {os.cpu_count()} CPU cores, no GPU.",
        f"Reproduce:\n\n    {command}",
        protocol,
        table(runs, seeds),
        "Target (DESIGN.md): our prefix-tuning reaches at least the BLEU of PEFT's prefix "
        "tuning and of full fine-tuning at the same budget. Mean BLEU per N:\n\n"
        + "\n".join(verdicts(runs)),
        f"![BLEU vs N per method]({image})",
        "\n".join(samples),
    ]
    return "\n\n".join(part for part in parts if part)


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[50], help="training-set sizes")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 … S-1 (split and training)")
    parser.add_argument("--test-mrs", type=int, default=40, help="held-out MRs to evaluate on")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--lr-prefix", type=float, default=5e-4, help="ours and PEFT's")
    parser.add_argument("--lr-finetune", type=float, default=5e-5)
    parser.add_argument("--decode-batch", type=int, default=8, help="MRs per decoding call")
    parser.add_argument("--model", default="embedded", help="model directory or 'embedded'")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is faster "
        "when other processes share the cores",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=BENCHMARKS, help="benchmarks file to update")
    parser.add_argument("--plot", type=Path, default=PLOT, help="where the PNG goes")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke configuration (implies --no-write)"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.n, args.seeds, args.test_mrs, args.epochs = [8], 1, 4, 1
        args.max_new_tokens, args.no_write = 16, True
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def main(argv: Iterable[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, settings=Settings())
    mrs = read_e2e()
    init_tokens = len(
        loaded.tokenizer.encode(TEXT_INIT.removeprefix("text:"), add_special_tokens=False)
    )
    seeds = list(range(args.seeds))
    runs: list[Run] = []
    jobs = [(n, seed, m) for n in args.n for seed in seeds for m in args.methods]
    with tqdm(total=len(jobs), desc="e2e_quality", unit="run") as overall:
        for n in args.n:
            for seed in seeds:
                split = low_data_split(mrs, n_train=n, n_test=args.test_mrs, seed=seed)
                for method in args.methods:
                    overall.set_postfix_str(f"N={n} seed={seed} {method}")
                    run = run_one(loaded, method, n, seed, split, args)
                    runs.append(run)
                    tqdm.write(
                        f"N={n} seed={seed} {method:13s} BLEU {run.bleu:5.1f}  "
                        f"best epoch {run.best_epoch}  {run.tokens_per_second:4.0f} tok/s  "
                        f"train {run.train_seconds:4.0f}s decode {run.decode_seconds:4.0f}s"
                    )
                    overall.update(1)
                if not args.no_write:  # after every seed, so a cut run keeps what it finished
                    plot(runs, args.plot)
                    write_section(TITLE, section(runs, args, seeds, init_tokens), args.out)
    print()
    print(table(runs, seeds))
    print("\n".join(verdicts(runs)))
    if not args.no_write:
        print(f"\nwrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
