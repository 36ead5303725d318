"""The ``prefixd`` console command.

User errors (bad data, bad flags, a missing model, a prefix for another model) print one
line ``error: …`` on stderr and exit with code 2 — never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from prefixd import cli_nightly, cli_up, cli_workers
from prefixd.cli_base_prefixes import base_prefixes_app
from prefixd.cli_db import db_app
from prefixd.cli_peft import peft_app
from prefixd.cli_support import quiet_libraries, user_errors
from prefixd.cli_tenants import tenants_app

if TYPE_CHECKING:  # loaded lazily: `prefixd --help` does not import torch
    from common.model_loading import LoadedModel

app = typer.Typer(
    name="prefixd",
    help="Per-tenant prefix-tuning on one frozen language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _load(model: str | None) -> LoadedModel:
    from common.config import get_settings
    from common.model_loading import EMBEDDED, load_model

    settings = get_settings()
    name = model or settings.model
    if name == EMBEDDED:
        typer.echo("Loading the embedded model (the first run converts it once, ~30 s)…", err=True)
    return load_model(name, settings=settings)


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", help="Hugging Face model directory, or 'embedded' (default: PREFIXD_MODEL)."
    ),
]


@app.command("train-local")
@user_errors
def train_local(
    data: Annotated[Path, typer.Option("--data", help="Training data, JSONL of {input, output}.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the prefix (.safetensors).")],
    model: ModelOption = None,
    prefix_length: Annotated[int, typer.Option("--prefix-length")] = 10,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            help="Passes over the data. Unset: an automatic budget from the data size, with a "
            "validation split and early stopping from 40 examples (common/training_budget.py).",
        ),
    ] = None,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 5e-4,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    init: Annotated[str, typer.Option("--init", help="'random' or 'text:WORDS'.")] = "random",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    validation: Annotated[
        Path | None, typer.Option("--validation", help="Validation JSONL (early stopping).")
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option("--patience", help="Epochs without validation improvement before stopping."),
    ] = None,
    mid_dim: Annotated[
        int, typer.Option("--mid-dim", help="Width of P' and of the reparameterization MLP.")
    ] = 512,
    loss_reduction: Annotated[
        str, typer.Option("--loss-reduction", help="token_mean or sequence_sum (the paper's).")
    ] = "token_mean",
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32, float16 or bfloat16 (stored prefix).")
    ] = "float32",
) -> None:
    """Train a prefix on a JSONL file with the frozen base model, on this machine."""
    from tqdm import tqdm

    from common.data import read_jsonl
    from common.prefix_file import save_prefix
    from common.training import Progress, train_prefix
    from common.training_budget import automatic_validation_split
    from common.training_config import TrainingConfig

    if dtype not in ("float32", "float16", "bfloat16"):
        raise typer.BadParameter(
            f"expected float32, float16 or bfloat16, got {dtype!r}", param_hint="--dtype"
        )
    config = TrainingConfig(
        prefix_length=prefix_length,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        init=init,
        seed=seed,
        patience=patience,
        mid_dim=mid_dim,
        loss_reduction=loss_reduction,  # type: ignore[arg-type]
        dtype=dtype,  # type: ignore[arg-type]
    )
    config.validate()  # before the (slow) model load: bad flags fail at once
    examples = read_jsonl(data)
    validation_examples = read_jsonl(validation) if validation else None
    if validation_examples is None and epochs is None:  # the rule jobs follow too
        examples, validation_examples = automatic_validation_split(examples, seed)
        if validation_examples:
            typer.echo(
                f"holding out {len(validation_examples)} of the {len(examples) + len(validation_examples)} "
                "examples for validation and early stopping (automatic budget)",
                err=True,
            )
    quiet_libraries()
    loaded = _load(model)
    with tqdm(total=None, unit="step", desc="training", file=sys.stderr) as bar:

        def show(progress: Progress) -> None:
            bar.total = progress.total_steps
            postfix = {"loss": f"{progress.loss:.3f}", "tok/s": f"{progress.tokens_per_second:.0f}"}
            if progress.validation_loss is not None:
                postfix["val"] = f"{progress.validation_loss:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)

        result = train_prefix(
            loaded, examples, config, validation=validation_examples, on_progress=show
        )
    save_prefix(result.prefix, out)
    metrics = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result.prefix.metrics.items()
    )
    typer.echo(f"wrote {out} (prefix length {result.prefix.prefix_length}; {metrics})")


@app.command("generate-local")
@user_errors
def generate_local(
    inputs: Annotated[
        list[str], typer.Argument(help="One or more inputs; one output is printed per input.")
    ],
    prefix: Annotated[
        Path | None, typer.Option("--prefix", help="Prefix file; without it, the bare model.")
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            help="The base prefix file a stacked prefix (base_mode stack) was trained on; "
            "checked by its fingerprint.",
        ),
    ] = None,
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
    num_beams: Annotated[int, typer.Option("--num-beams")] = 1,
    sample: Annotated[
        bool, typer.Option("--sample", help="Sample instead of greedy/beam decoding.")
    ] = False,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    presence_penalty: Annotated[
        float,
        typer.Option("--presence-penalty", help="OpenAI's: against tokens already output."),
    ] = 0.0,
    frequency_penalty: Annotated[
        float,
        typer.Option("--frequency-penalty", help="OpenAI's: against tokens, per repeat."),
    ] = 0.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list of {input, output}.")
    ] = False,
) -> None:
    """Generate with a prefix (all inputs decoded together in one batch)."""
    from common.architectures import prefix_shape
    from common.generation import DecodingConfig, generate_texts
    from common.prefix_file import load_prefix

    decoding = DecodingConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )
    decoding.validate()
    quiet_libraries()
    loaded = _load(model)
    loaded_prefix = None
    if base is not None and prefix is None:
        raise typer.BadParameter("--base needs --prefix (a prefix stacked on it)")
    if prefix is not None:
        shape = prefix_shape(loaded.model.config)
        loaded_prefix = load_prefix(
            prefix, expected_fingerprint=loaded.fingerprint, expected_shape=shape
        )
        loaded_prefix = served_local_prefix(loaded_prefix, prefix, base, loaded.fingerprint, shape)
    outputs = generate_texts(loaded, [(loaded_prefix, text) for text in inputs], decoding)
    if as_json:
        typer.echo(
            json.dumps(
                [{"input": i, "output": o} for i, o in zip(inputs, outputs, strict=True)], indent=2
            )
        )
    else:
        for output in outputs:
            typer.echo(output)


def served_local_prefix(
    loaded_prefix: Any, path: Path, base: Path | None, fingerprint: str, shape: Any
) -> Any:
    """A stacked prefix behind its base file (``--base``), checked by the base's
    fingerprint; a stacked prefix without ``--base`` is refused, never decoded alone."""
    from common.base_prefix import inference_prefix
    from common.errors import IncompatiblePrefixError
    from common.prefix_file import load_prefix

    if loaded_prefix.base_mode != "stack":
        if base is not None:
            raise IncompatiblePrefixError(
                f"{path} is not stacked on a base prefix (base mode "
                f"{loaded_prefix.base_mode or 'none'}); drop --base"
            )
        return loaded_prefix
    if base is None:
        raise IncompatiblePrefixError(
            f"{path} is stacked on base prefix {loaded_prefix.base_prefix_id}: pass its file "
            "with --base FILE"
        )
    base_prefix = load_prefix(base, expected_fingerprint=fingerprint, expected_shape=shape)
    try:
        return inference_prefix(
            loaded_prefix, base_prefix, base_prefix_id=loaded_prefix.base_prefix_id
        )
    except IncompatiblePrefixError as error:
        raise IncompatiblePrefixError(f"--base {base}: {error}") from None


@app.command()
@user_errors
def demo(
    examples: Annotated[int, typer.Option("--examples", help="E2E training examples.")] = 100,
    epochs: Annotated[int, typer.Option("--epochs")] = 3,
    model: ModelOption = None,
    show: Annotated[
        int, typer.Option("--show", help="Unseen meaning representations to generate for.")
    ] = 5,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Train a prefix on E2E restaurant descriptions and compare it with the untuned model."""
    from common.config import get_settings
    from prefixd.demo import run_demo

    quiet_libraries()
    run_demo(get_settings(), _load(model), examples=examples, epochs=epochs, show=show, seed=seed)


app.add_typer(db_app, name="db", help="Database migrations.")
app.command("worker")(cli_workers.worker)
app.command("up")(user_errors(cli_up.up))
app.add_typer(cli_workers.jobs_app, name="jobs", help="Training jobs (operators).")
app.add_typer(tenants_app, name="tenants", help="Tenants (operators): erase, verify.")
app.add_typer(peft_app, name="peft", help="PEFT prefix-tuning adapters: export, import.")
app.add_typer(
    base_prefixes_app,
    name="base-prefixes",
    help="Base prefixes (operators): upload operator data, train, list, default, delete.",
)
app.command("nightly")(cli_nightly.nightly)


def main() -> None:
    app()
