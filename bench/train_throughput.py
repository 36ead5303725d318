"""Training throughput: our prefix-tuning vs Hugging Face PEFT's, same model, same examples.

Both sides train a length-10 prefix with a 512-wide reparameterization MLP on the same E2E
examples (same collation, loss on output tokens, AdamW, same learning rate, batch size and
step count) on the embedded model. prefixd runs as it ships (``TrainingConfig`` defaults:
batches grouped by length, float32); PEFT runs as its documentation shows, in float32 on
in-order batches of the same examples. A third side, prefixd with ``compute_dtype="auto"``
(bfloat16 autocast of the frozen model where the CPU has native bfloat16, opt-in), shows
what autocast buys. Rounds alternate so that load from other processes on this shared machine hits every
side alike; the figure that matters is the ratio of real (non-padding) tokens/s.

    .venv/bin/python -m bench.train_throughput [--steps 10] [--rounds 3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model

from bench.report import write_section
from common.architectures import max_positions
from common.config import get_settings
from common.data import EncodedExample, collate, encode_examples
from common.datasets.e2e import low_data_split, read_e2e
from common.model_loading import LoadedModel, load_model
from common.training import (
    length_grouped_batches,
    min_grouped_examples,
    output_loss,
    resolved_compute_dtype,
    train_prefix,
)
from common.training_config import TrainingConfig

PREFIX_LENGTH, MID_DIM, LEARNING_RATE = 10, 512, 5e-4


def ours(
    loaded: LoadedModel,
    examples,
    batch_size: int,
    steps: int,
    seed: int,
    *,
    compute_dtype: str = "auto",
    losses: list[float] | None = None,
) -> float:
    """tokens/s of common.training.train_prefix over its first ``steps`` optimizer steps on
    ``examples`` (the whole dataset decides its batching, as in a job); each step's training
    loss is appended to ``losses`` when given."""
    config = TrainingConfig(
        compute_dtype=compute_dtype,  # type: ignore[arg-type]
        prefix_length=PREFIX_LENGTH,
        mid_dim=MID_DIM,
        learning_rate=LEARNING_RATE,
        batch_size=batch_size,
        epochs=1,
        seed=seed,
        warmup_ratio=0.0,
    )
    polls = itertools.count()  # polled once before every step
    result = train_prefix(loaded, examples, config, should_stop=lambda: next(polls) >= steps)
    if losses is not None:
        losses.extend(p.loss for p in result.history)
    return result.history[-1].tokens_per_second


def peft_step_fn(loaded: LoadedModel) -> Callable[[Sequence[EncodedExample]], int]:
    """A PEFT prefix-tuning training step on a copy of the model (PEFT wraps it in place)."""
    model = get_peft_model(
        copy.deepcopy(loaded.model),
        PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=PREFIX_LENGTH,
            prefix_projection=True,
            encoder_hidden_size=MID_DIM,
        ),
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE
    )
    pad = int(loaded.tokenizer.pad_token_id)

    def step(encoded: Sequence[EncodedExample]) -> int:
        batch = collate(encoded, pad_id=pad)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = output_loss(logits, batch.labels, "token_mean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return int(batch.attention_mask.sum())

    return step


def peft(step, encoded: Sequence[EncodedExample], batch_size: int, steps: int) -> float:
    tokens, started = 0, time.perf_counter()
    for i in range(steps):
        tokens += step(encoded[i * batch_size : (i + 1) * batch_size])
    return tokens / (time.perf_counter() - started)


LOSS_PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "bf16_loss_curves.png"


def plot_loss_curves(curves: dict[str, list[list[float]]], compute: str, path: Path) -> None:
    """The two prefixd sides' training losses, float32 and ``compute``, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for axis, (key, title) in zip(
        axes, (("float32", "float32"), ("auto", f"{compute} autocast")), strict=True
    ):
        for round_, losses in enumerate(curves[key]):
            axis.plot(range(1, len(losses) + 1), losses, marker="o", label=f"round {round_ + 1}")
        axis.set_title(f"prefixd training loss, {title}")
        axis.set_xlabel("optimizer step (same batches in both panels)")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].set_ylabel("training loss (token mean)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def padding_share(batches: Sequence[Sequence[EncodedExample]]) -> float:
    """Padding positions / all positions of right-padded ``batches``."""
    real = sum(len(e) for batch in batches for e in batch)
    computed = sum(len(batch) * max(len(e) for e in batch) for batch in batches)
    return 1 - real / computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default=None, help="model directory or 'embedded'")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    args = parser.parse_args()

    settings = get_settings()
    loaded = load_model(args.model, settings=settings)
    # The smallest dataset that ships length-grouped (smaller ones get a plain shuffle:
    # common.training.epoch_batches); PEFT takes its first steps × batch examples in order.
    n_train = max(args.steps * args.batch_size, min_grouped_examples(args.batch_size))
    split = low_data_split(read_e2e(), n_train=n_train, n_test=1, seed=0)
    encoded = encode_examples(
        loaded.tokenizer, split.train, max_tokens=max_positions(loaded.model.config) - PREFIX_LENGTH
    )
    peft_step = peft_step_fn(loaded)
    # Warm-up: first calls pay for allocator growth and lazy initialization.
    ours(loaded, split.train, args.batch_size, 1, seed=0)
    peft(peft_step, encoded, args.batch_size, 1)

    ours(loaded, split.train, args.batch_size, 1, seed=0, compute_dtype="float32")

    results: dict[str, list[float]] = {"prefixd": [], "prefixd float32": [], "PEFT": []}
    # per round, each step's loss of the two prefixd sides: same seed, so the same batches
    curves: dict[str, list[list[float]]] = {"auto": [], "float32": []}
    for round_ in range(args.rounds):
        curves["auto"].append([])
        results["prefixd"].append(
            ours(
                loaded,
                split.train,
                args.batch_size,
                args.steps,
                seed=round_,
                losses=curves["auto"][-1],
            )
        )
        results["PEFT"].append(peft(peft_step, encoded, args.batch_size, args.steps))
        curves["float32"].append([])
        results["prefixd float32"].append(
            ours(
                loaded,
                split.train,
                args.batch_size,
                args.steps,
                round_,
                compute_dtype="float32",
                losses=curves["float32"][-1],
            )
        )
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()))

    ratios = [a / b for a, b in zip(results["prefixd"], results["PEFT"], strict=True)]
    fp32_ratios = [a / b for a, b in zip(results["prefixd float32"], results["PEFT"], strict=True)]
    median = {name: statistics.median(values) for name, values in results.items()}
    in_order = [encoded[i : i + args.batch_size] for i in range(0, len(encoded), args.batch_size)]
    lengths = [len(e) for e in encoded]
    grouped = [
        [encoded[i] for i in rows]
        for rows in length_grouped_batches(lengths, args.batch_size, random.Random(0))
    ]
    compute = resolved_compute_dtype(loaded.model, "auto")
    differences = [
        abs(a - b) / b
        for auto, fp32 in zip(curves["auto"], curves["float32"], strict=True)
        for a, b in zip(auto, fp32, strict=True)
    ]
    if not args.no_write:
        plot_loss_curves(curves, compute, LOSS_PLOT)
    loss_rows = "\n".join(
        f"| {round_ + 1} | {step + 1} | {fp32:.4f} | {auto:.4f} |"
        for round_, (autos, fp32s) in enumerate(zip(curves["auto"], curves["float32"], strict=True))
        for step, (auto, fp32) in enumerate(zip(autos, fp32s, strict=True))
    )
    body = f"""Prefix-tuning training throughput on `{loaded.source.rsplit("/", 1)[-1]}` (prefix length
{PREFIX_LENGTH}, MLP {MID_DIM}, batch {args.batch_size}, one dataset of {len(encoded)} E2E examples
for every side, the smallest that prefixd groups by length): {args.rounds} alternating rounds
of {args.steps} optimizer steps per side; tokens/s counts real (non-padding) tokens.

| side | batches | compute | tokens/s per round | median |
|---|---|---|---|---|
| prefixd as shipped (`train_prefix`, `TrainingConfig()` defaults) | grouped by length ({padding_share(grouped):.0%} padding) | float32 | {", ".join(f"{v:.0f}" for v in results["prefixd float32"])} | {median["prefixd float32"]:.0f} |
| prefixd, `compute_dtype="auto"` (opt-in) | grouped by length | {compute} autocast | {", ".join(f"{v:.0f}" for v in results["prefixd"])} | {median["prefixd"]:.0f} |
| Hugging Face PEFT prefix tuning | in order ({padding_share(in_order):.0%} padding) | float32 | {", ".join(f"{v:.0f}" for v in results["PEFT"])} | {median["PEFT"]:.0f} |

**Ratio prefixd as shipped / PEFT: {statistics.median(fp32_ratios):.2f}×** (per round: {", ".join(f"{r:.2f}" for r in fp32_ratios)}; target ≥ 1.3: {"met" if statistics.median(fp32_ratios) >= 1.3 else "missed"}).
With `compute_dtype="auto"` ({compute} autocast) / PEFT: {statistics.median(ratios):.2f}× (per round: {", ".join(f"{r:.2f}" for r in ratios)}).

Loss: the two prefixd sides of a round train on the same batches from the same seed, so
their per-step training losses compare directly (from the second step on, the two
trajectories drift apart; bfloat16's effect on a whole run's quality is not measured, so it
stays opt-in; side by side:
[img/bf16_loss_curves.png](img/bf16_loss_curves.png)); the {compute} loss differs from the float32
one by {statistics.median(differences):.2%} in the median step, {max(differences):.2%} at most.

| round | step | float32 loss | {compute} loss |
|---|---|---|---|
{loss_rows}

What is compared: the same dataset, batch size, steps, loss and optimizer; each side batches
and computes as it ships. prefixd's batches are grouped by length (`common.training.length_grouped_batches`,
on by default for datasets of two pools, 256 examples at batch 8, and more; smaller ones get a
plain shuffle, as fast as PEFT's batches, because grouping one pool cost quality) where PEFT's
loader takes them in order; both compute in float32 (bfloat16
autocast is opt-in in prefixd until its effect on quality is measured). Other
differences: prefixd runs the vocabulary projection (49,152 × 576 on this model) only at
output-token positions (`common.training.prefix_output_loss`), where PEFT computes logits for
every position; and prefixd computes the prefix once per step and expands it over the batch
without copying, where PEFT runs its embedding and MLP once per batch row. On a shared
machine, read the per-round spread as the noise level.

Reproduce: `.venv/bin/python -m bench.train_throughput --steps {args.steps} --rounds {args.rounds} --batch-size {args.batch_size}`
"""
    print(body)
    if not args.no_write:
        print("wrote", write_section("Training throughput (bench/train_throughput.py)", body))


if __name__ == "__main__":
    main()
