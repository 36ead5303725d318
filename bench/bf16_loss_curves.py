"""bfloat16 vs float32 training loss: the same run in both compute precisions.

``train_prefix`` twice on the embedded model with the same examples, seed, batches and
hyperparameters, once with ``compute_dtype="float32"`` and once with ``"bfloat16"`` (autocast
of the frozen model; the prefix, its MLP, gradients and AdamW stay float32). Records the
per-step training loss of both, and the held-out loss of both final prefixes computed in
float32, and plots the two curves side by side (docs/bf16_loss_curves.png). The question is
whether bfloat16 trains to the same loss, within the noise of the run.

    .venv/bin/python -m bench.bf16_loss_curves [--steps 30] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from bench.report import write_section
from common.architectures import max_positions
from common.config import get_settings
from common.data import encode_examples
from common.datasets.e2e import low_data_split, read_e2e
from common.model_loading import load_model
from common.training import TrainingConfig, evaluate_loss, train_prefix

PLOT = Path(__file__).resolve().parent.parent / "docs" / "bf16_loss_curves.png"
PRECISIONS = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=32, help="held-out examples")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/ alone")
    args = parser.parse_args()

    loaded = load_model(None, settings=get_settings())
    split = low_data_split(
        read_e2e(), n_train=args.steps * args.batch_size, n_test=args.heldout, seed=0
    )
    heldout = encode_examples(
        loaded.tokenizer, split.test, max_tokens=max_positions(loaded.model.config) - 10
    )
    curves: dict[str, list[float]] = {}
    heldout_loss: dict[str, float] = {}
    for precision in PRECISIONS:
        config = TrainingConfig(
            epochs=1, batch_size=args.batch_size, seed=0, compute_dtype=precision
        )
        result = train_prefix(loaded, split.train, config)
        curves[precision] = [p.loss for p in result.history]
        heldout_loss[precision] = evaluate_loss(
            loaded.model,
            result.prefix.key_values.float(),
            heldout,
            batch_size=8,
            pad_id=int(loaded.tokenizer.pad_token_id),
        )
        print(precision, [f"{v:.3f}" for v in curves[precision]], heldout_loss[precision])

    gaps = [abs(a - b) for a, b in zip(curves["float32"], curves["bfloat16"], strict=True)]
    relative = [g / a for g, a in zip(gaps, curves["float32"], strict=True)]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for axis, precision in zip(axes, PRECISIONS, strict=True):
        axis.plot(range(1, len(curves[precision]) + 1), curves[precision], marker=".")
        axis.set_title(f"{precision} compute (held-out loss {heldout_loss[precision]:.3f})")
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (token mean)")
    figure.suptitle(
        f"{loaded.source.rsplit('/', 1)[-1]}: same seed, examples and batches "
        f"(batch {args.batch_size}, E2E)"
    )
    figure.tight_layout()
    if not args.no_write:
        figure.savefig(PLOT, dpi=100)

    every = max(1, len(gaps) // 6)
    rows = "\n".join(
        f"| {step + 1} | {curves['float32'][step]:.3f} | {curves['bfloat16'][step]:.3f} |"
        for step in sorted({*range(0, len(gaps), every), len(gaps) - 1})
    )
    body = f"""The same `train_prefix` run on `{loaded.source.rsplit("/", 1)[-1]}` twice
(prefix length 10, MLP 512, batch {args.batch_size}, {args.steps} steps, one epoch of E2E
examples, seed 0, the same batches), with the frozen model's compute in float32 and under
bfloat16 autocast; both held-out losses are computed in float32 on {len(heldout)} other E2E
examples. The curves side by side: [bf16_loss_curves.png](bf16_loss_curves.png).

| step | float32 loss | bfloat16 loss |
|---|---|---|
{rows}

Held-out loss of the final prefix: float32 {heldout_loss["float32"]:.4f}, bfloat16
{heldout_loss["bfloat16"]:.4f} ({heldout_loss["bfloat16"] / heldout_loss["float32"] - 1:+.2%}).
Per-step training loss difference: median {statistics.median(relative):.2%}, largest
{max(relative):.2%} of the float32 loss.

Reproduce: `.venv/bin/python -m bench.bf16_loss_curves --steps {args.steps} --batch-size {args.batch_size}`
"""
    print(body)
    if not args.no_write:
        print("wrote", write_section("bfloat16 training loss (bench/bf16_loss_curves.py)", body))


if __name__ == "__main__":
    main()
