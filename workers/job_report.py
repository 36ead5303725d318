"""What a job's prefix bought: its loss and token accuracy on the job's validation examples
against the alternatives a tenant has without it.

Rows, each evaluated with the same frozen model on the same examples (those that fit the
context behind every compared prefix):

- ``new``: the job's prefix as served (stacked on its base when it is stacked);
- ``bare_model``: no prefix at all (a zero-length prefix, which is exactly the plain model);
- ``base``: the base prefix alone, when the job trained from one;
- ``previous``: the tenant's active version before this job, as served, when it has one.

Loss is the mean cross-entropy per output token; token accuracy the share of output tokens
whose argmax is the target (teacher-forced). A job without validation examples says so
(``status: "no_validation_examples"``) instead of inventing numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.architectures import (
    decoder_start_id,
    is_encoder_decoder,
    max_positions,
    prefix_shape,
)
from common.data import IGNORE_INDEX, EncodedExample, Example, collate, encode_example
from common.kv_cache import expand_prefix
from common.model_loading import LoadedModel
from common.training import output_loss, prefix_logits

NO_VALIDATION = "no_validation_examples"


@dataclass(frozen=True)
class Candidate:
    """A row of the report: ``key_values`` ``(layers, 2, kv_heads, P, head_dim)`` as served
    (P = 0: the bare model), or ``None`` with ``unavailable`` saying why it was not measured."""

    name: str
    key_values: torch.Tensor | None
    detail: dict[str, Any]
    unavailable: str | None = None


@torch.no_grad()
def loss_and_accuracy(
    loaded: LoadedModel,
    key_values: torch.Tensor,
    examples: Sequence[EncodedExample],
    *,
    batch_size: int,
) -> tuple[float, float]:
    """Mean loss per output token and token accuracy of ``examples`` behind ``key_values``
    ``(layers, 2, kv_heads, P, head_dim)`` (``common.training``'s logits and loss)."""
    model = loaded.model
    pad = loaded.tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else 0)
    start_id = decoder_start_id(model.config)
    total_loss, correct, tokens = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(
            examples[start : start + batch_size], pad_id=pad_id, decoder_start_id=start_id
        )
        logits = prefix_logits(model, expand_prefix(key_values, len(batch.labels)), batch)
        labels = batch.labels.to(logits.device)  # (B, T)
        has_loss = labels != IGNORE_INDEX
        count = int(has_loss.sum())
        total_loss += float(output_loss(logits, labels, "token_mean")) * count
        correct += int((logits.argmax(dim=-1)[has_loss] == labels[has_loss]).sum())
        tokens += count
    return total_loss / max(tokens, 1), correct / max(tokens, 1)


def bare_model(loaded: LoadedModel) -> torch.Tensor:
    """A zero-length prefix ``(layers, 2, kv_heads, 0, head_dim)``: the plain model."""
    return torch.zeros(prefix_shape(loaded.model.config).tensor_shape(0))


def personalization_report(
    loaded: LoadedModel,
    validation: Sequence[Example] | None,
    candidates: Sequence[Candidate],
    *,
    batch_size: int,
) -> dict[str, Any]:
    """The job's ``result``: per candidate ``{loss, token_accuracy, prefix_length, …}``
    on the validation examples that fit behind the longest compared prefix, and the new
    prefix's loss change against each of the others."""
    if not validation:
        return {
            "status": NO_VALIDATION,
            "message": "the job had no validation examples (set hyperparameters."
            "validation_split or validation_dataset_id), so nothing was measured",
        }
    measured = [c for c in candidates if c.key_values is not None]
    config = loaded.model.config
    longest = max(int(c.key_values.shape[3]) for c in measured if c.key_values is not None)
    limit = max_positions(config) - longest
    two_sided = is_encoder_decoder(config)
    encoded = []
    for example in validation:
        item = encode_example(loaded.tokenizer, example, encoder_decoder=two_sided)
        if (item.longest_side if two_sided else len(item)) <= limit:
            encoded.append(item)
    if not encoded:
        return {
            "status": "no_example_fits",
            "message": f"none of the {len(validation)} validation example(s) fits the context "
            f"behind a {longest}-token prefix",
        }
    rows: dict[str, Any] = {}
    dtype = next(loaded.model.parameters()).dtype
    for candidate in candidates:
        if candidate.key_values is None:
            rows[candidate.name] = {**candidate.detail, "unavailable": candidate.unavailable}
            continue
        loss, accuracy = loss_and_accuracy(
            loaded, candidate.key_values.to(dtype), encoded, batch_size=batch_size
        )
        rows[candidate.name] = {
            **candidate.detail,
            "loss": loss,
            "token_accuracy": accuracy,
            "prefix_length": int(candidate.key_values.shape[3]),
        }
    new_loss = rows.get("new", {}).get("loss")
    for name, row in rows.items():
        if name != "new" and "loss" in row and new_loss is not None and row["loss"] > 0:
            row["new_loss_change"] = new_loss / row["loss"] - 1.0
    return {
        "status": "measured",
        "examples": len(encoded),
        "examples_left_out": len(validation) - len(encoded),
        "metric": "mean loss per output token; token accuracy, teacher-forced",
        "against": rows,
    }


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
