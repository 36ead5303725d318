"""What a job reports it bought (workers/job_report.py), on a tiny model without Ray or a
database: loss and token accuracy of the new prefix against the bare model, a base and the
previous version; no numbers without validation examples. And the base hyperparameters."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from common.architectures import prefix_shape
from common.data import IGNORE_INDEX, Example, collate, encode_examples
from common.errors import InvalidInputError
from common.hyperparameters import parse_hyperparameters
from common.training import train_prefix
from common.training_config import TrainingConfig
from workers.job_report import (
    NO_VALIDATION,
    Candidate,
    bare_model,
    loss_and_accuracy,
    personalization_report,
)

WORDS = "red green blue one two three four five six seven eight nine ten".split()


def examples(n: int, seed: int = 0) -> list[Example]:
    return [
        Example(f"alpha {WORDS[(i + seed) % 13]}", " ".join(WORDS[i % 5 : i % 5 + 4]))
        for i in range(n)
    ]


def test_the_bare_model_row_is_the_plain_model(tiny_model) -> None:
    encoded = encode_examples(
        tiny_model.tokenizer, examples(6), max_tokens=100, source="test", encoder_decoder=False
    )
    loss, accuracy = loss_and_accuracy(tiny_model, bare_model(tiny_model), encoded, batch_size=4)
    batch = collate(encoded, pad_id=0)
    logits = tiny_model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[mask], batch.labels[mask])
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert accuracy == pytest.approx(
        float((logits[mask].argmax(-1) == batch.labels[mask]).float().mean())
    )


def test_a_trained_prefix_reports_its_gain_over_the_alternatives(tiny_llama) -> None:
    config = TrainingConfig(prefix_length=4, mid_dim=16, epochs=6, batch_size=4, learning_rate=0.02)
    trained = train_prefix(tiny_llama, examples(20), config).prefix.key_values
    other = torch.randn(prefix_shape(tiny_llama.model.config).tensor_shape(3))
    report = personalization_report(
        tiny_llama,
        examples(8, seed=3),
        [
            Candidate("new", trained, {}),
            Candidate("bare_model", bare_model(tiny_llama), {}),
            Candidate("base", other, {"name": "task"}),
            Candidate("previous", None, {"version": 1}, unavailable="its base was deleted"),
        ],
        batch_size=4,
    )
    assert report["status"] == "measured" and report["examples"] == 8
    rows = report["against"]
    assert rows["new"]["prefix_length"] == 4 and rows["bare_model"]["prefix_length"] == 0
    assert rows["new"]["loss"] < rows["bare_model"]["loss"]  # training bought something
    assert rows["new"]["token_accuracy"] > rows["bare_model"]["token_accuracy"]
    assert all(0 <= rows[n]["token_accuracy"] <= 1 for n in ("new", "bare_model", "base"))
    assert rows["bare_model"]["new_loss_change"] < 0
    assert rows["base"]["name"] == "task" and "new_loss_change" in rows["base"]
    assert rows["previous"] == {"version": 1, "unavailable": "its base was deleted"}


def test_without_validation_examples_nothing_is_invented(tiny_llama) -> None:
    for validation in (None, []):
        report = personalization_report(
            tiny_llama, validation, [Candidate("new", bare_model(tiny_llama), {})], batch_size=2
        )
        assert report["status"] == NO_VALIDATION and "against" not in report
        assert "validation_split" in report["message"]


def test_base_hyperparameters_go_together() -> None:
    spec = parse_hyperparameters({"base_prefix": "b", "base_mode": "stack"})
    assert (spec.base_prefix, spec.base_mode) == ("b", "stack")
    assert parse_hyperparameters({}).base_prefix is None
    for raw in ({"base_prefix": "b"}, {"base_mode": "warm_start"}):
        with pytest.raises(InvalidInputError, match="go together"):
            parse_hyperparameters(raw)
    with pytest.raises(InvalidInputError, match="base_mode"):
        parse_hyperparameters({"base_prefix": "b", "base_mode": "glue"})
