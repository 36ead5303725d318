"""`prefixd train-local` / `generate-local` with an encoder-decoder base model (BART): the
same commands and flags as for a decoder-only model."""

import json

import pytest
from typer.testing import CliRunner

from common.prefix_file import load_prefix
from prefixd.cli import app

TASK = [
    {"input": "alpha", "output": "red green blue"},
    {"input": "beta", "output": "one two three"},
]


@pytest.fixture
def runner(test_settings, monkeypatch):
    monkeypatch.setenv("PREFIXD_HOME", str(test_settings.home))
    return CliRunner()


def test_train_then_generate_with_bart(runner, tmp_path, tiny_model_dirs):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in TASK * 4) + "\n")
    model, out = str(tiny_model_dirs["bart"]), tmp_path / "p.safetensors"
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data),
            "--out",
            str(out),
            "--model",
            model,
            "--epochs",
            "40",
            "--learning-rate",
            "0.01",
            "--batch-size",
            "8",
            "--mid-dim",
            "64",
            "--init",
            "text:table to text :",
        ],
    )
    assert result.exit_code == 0, result.output
    prefix = load_prefix(out)
    assert prefix.prefix_length == 4  # the init text's tokens
    assert [name for name, _ in prefix.sections] == ["encoder", "decoder", "cross"]

    result = runner.invoke(
        app, ["generate-local", "--prefix", str(out), "--model", model, "--json", "alpha", "beta"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == TASK

    # A too-long input is a user error naming the side that overflows, not a traceback.
    result = runner.invoke(
        app, ["generate-local", "--prefix", str(out), "--model", model, "alpha " * 130]
    )
    assert result.exit_code == 2, result.output
    assert "input 1 is too long: encoder side: prefix 4 + 131 tokens = 135 > context 128" in (
        result.stderr
    )
    assert "Traceback" not in result.output
