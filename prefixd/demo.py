"""``prefixd demo``: prefix-tuning on E2E in a few minutes on a laptop.

Trains a prefix on a few hundred (by default 100) E2E examples with the frozen embedded
model, then generates for meaning representations never seen in training, the untuned
model's output beside the prefix's. Writes the prefix and a loss-curve PNG to
``PREFIXD_HOME/demo/``.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import typer
from tqdm import tqdm

from common.config import Settings
from common.datasets.e2e import low_data_split, read_e2e
from common.generation import DecodingConfig, generate_texts
from common.model_loading import LoadedModel
from common.prefix_file import save_prefix
from common.training import Progress, train_prefix
from common.training_config import TrainingConfig


def run_demo(
    settings: Settings, loaded: LoadedModel, *, examples: int, epochs: int, show: int, seed: int
) -> None:
    split = low_data_split(read_e2e(), n_train=examples, n_test=show, seed=seed)
    config = TrainingConfig(
        prefix_length=10, epochs=epochs, learning_rate=5e-4, batch_size=8, seed=seed, init="random"
    )
    typer.echo(f"Training a prefix on {len(split.train)} E2E examples ({epochs} epochs)…", err=True)
    history: list[Progress] = []
    with tqdm(total=None, unit="step", desc="training", file=sys.stderr) as bar:

        def on_progress(progress: Progress) -> None:
            history.append(progress)
            bar.total = progress.total_steps
            bar.set_postfix(loss=f"{progress.loss:.3f}", tok_s=f"{progress.tokens_per_second:.0f}")
            bar.update(1)

        result = train_prefix(
            loaded, split.train, config, validation=split.dev, on_progress=on_progress
        )

    out_dir = settings.home_dir / "demo"
    prefix_path = save_prefix(result.prefix, out_dir / "e2e-prefix.safetensors")
    plot_path = plot_losses(history, out_dir / "e2e-loss.png")

    decoding = DecodingConfig(max_new_tokens=60)
    mrs = [item.mr for item in split.test]
    typer.echo("Generating for unseen meaning representations…", err=True)
    untuned = generate_texts(loaded, [(None, mr) for mr in mrs], decoding)
    tuned = generate_texts(loaded, [(result.prefix, mr) for mr in mrs], decoding)
    width = 96
    for item, before, after in zip(split.test, untuned, tuned, strict=True):
        typer.echo("─" * width)
        typer.echo(textwrap.fill(f"MR:        {item.mr}", width, subsequent_indent=" " * 11))
        typer.echo(
            textwrap.fill(f"untuned:   {before or '(empty)'}", width, subsequent_indent=" " * 11)
        )
        typer.echo(
            textwrap.fill(f"prefix:    {after or '(empty)'}", width, subsequent_indent=" " * 11)
        )
        typer.echo(
            textwrap.fill(f"reference: {item.references[0]}", width, subsequent_indent=" " * 11)
        )
    typer.echo("─" * width)
    size_kib = result.prefix.key_values.numel() * result.prefix.key_values.element_size() / 1024
    parameters = sum(p.numel() for p in loaded.model.parameters())
    typer.echo(
        f"prefix: {prefix_path} ({size_kib:.0f} KiB, {result.prefix.key_values.numel() / parameters:.3%} "
        f"of the model's {parameters / 1e6:.0f}M parameters); loss curve: {plot_path}"
    )


def plot_losses(history: list[Progress], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([p.step for p in history], [p.loss for p in history], label="training loss")
    validation = [(p.step, p.validation_loss) for p in history if p.validation_loss is not None]
    if validation:
        axis.plot(*zip(*validation, strict=True), "o-", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss per output token")
    axis.set_title("prefix-tuning on E2E")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
