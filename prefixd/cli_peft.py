"""``prefixd peft export|import``: prefixd prefix files to and from Hugging Face PEFT
prefix-tuning adapter directories (``common/peft_adapter.py`` says what maps)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prefixd.cli_support import user_errors

if TYPE_CHECKING:
    from common.model_loading import LoadedModel

peft_app = typer.Typer(
    help="Convert prefixes to and from PEFT prefix-tuning adapters.", no_args_is_help=True
)

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", help="Hugging Face model directory, or 'embedded' (default: PREFIXD_MODEL)."
    ),
]


def _load(model: str | None) -> LoadedModel:
    from common.config import get_settings
    from common.model_loading import load_model

    settings = get_settings()
    return load_model(model or settings.model, settings=settings)


@peft_app.command("export")
@user_errors
def export_adapter(
    prefix: Annotated[Path, typer.Option("--prefix", help="A prefixd prefix file.")],
    out: Annotated[Path, typer.Option("--out", help="The adapter directory to write.")],
    model: ModelOption = None,
) -> None:
    """Write a prefix as a PEFT adapter directory (``PeftModel.from_pretrained`` loads it)."""
    from common.architectures import prefix_shape
    from common.peft_adapter import peft_adapter_files, write_peft_adapter
    from common.prefix_file import load_prefix

    loaded = _load(model)
    stored = load_prefix(
        prefix,
        expected_fingerprint=loaded.fingerprint,
        expected_shape=prefix_shape(loaded.model.config),
    )
    write_peft_adapter(peft_adapter_files(stored, base_model_name=loaded.source), out)
    typer.echo(f"wrote PEFT adapter {out} ({stored.prefix_length} virtual tokens)")


@peft_app.command("import")
@user_errors
def import_adapter(
    adapter: Annotated[Path, typer.Option("--adapter", help="A PEFT adapter directory.")],
    out: Annotated[Path, typer.Option("--out", help="The prefix file to write (.safetensors).")],
    model: ModelOption = None,
) -> None:
    """Turn a PEFT prefix-tuning adapter into a prefixd prefix file for the base model."""
    from common.peft_adapter import read_peft_adapter, read_peft_adapter_dir
    from common.prefix_file import save_prefix

    loaded = _load(model)
    prefix = read_peft_adapter(read_peft_adapter_dir(adapter), loaded)
    save_prefix(prefix, out)
    typer.echo(f"wrote prefix {out} ({prefix.prefix_length} virtual tokens)")
