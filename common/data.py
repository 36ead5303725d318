"""Training examples: JSONL parsing with line-precise errors, tokenization, batching.

A dataset is JSONL, one ``{"input": str, "output": str}`` object a line (blank lines are
ignored). An example becomes ``input <sep> output <eos>``: ``<sep>`` is the tokenizer's
BOS token (EOS when it has none). The model learns ``log p(output, eos | prefix, input)``:
input tokens, the separator and padding carry no loss (label ``-100``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from common.errors import InvalidInputError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input: str
    output: str


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]  # input tokens + separator
    target_ids: list[int]  # output tokens + eos

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def parse_jsonl_line(raw: str | bytes, *, where: str) -> Example | None:
    """One JSONL line → an :class:`Example`, or ``None`` for a blank line; an error names
    ``where`` (e.g. ``data.jsonl:3``)."""
    try:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"{where}: not valid UTF-8 ({error.reason})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{where}: invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise InvalidInputError(
            f'{where}: expected an object {{"input": ..., "output": ...}}, got {type(record).__name__}'
        )
    for name in ("input", "output"):
        if name not in record:
            raise InvalidInputError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], str):
            raise InvalidInputError(
                f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}"
            )
        if not record[name].strip():
            raise InvalidInputError(f"{where}: field {name!r} is empty")
    return Example(record["input"], record["output"])


def parse_jsonl(lines: Iterable[str | bytes], *, source: str) -> list[Example]:
    """Parse JSONL lines; every error names ``source`` and the 1-based line number."""
    examples: list[Example] = []
    for number, raw in enumerate(lines, start=1):
        example = parse_jsonl_line(raw, where=f"{source}:{number}")
        if example is not None:
            examples.append(example)
    if not examples:
        raise InvalidInputError(f"{source}: no examples (the file is empty)")
    return examples


def read_jsonl(path: str | Path) -> list[Example]:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return parse_jsonl(handle, source=str(path))
    except OSError as error:
        raise InvalidInputError(f"cannot read {path}: {error.strerror}") from None


def separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    token_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    if token_id is None:
        raise InvalidInputError("the tokenizer has neither a BOS nor an EOS token")
    return int(token_id)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return [*tokenizer.encode(text, add_special_tokens=False), separator_id(tokenizer)]


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example) -> EncodedExample:
    """``input <sep>`` as the prompt, ``output <eos>`` as the target."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidInputError("the tokenizer has no EOS token")
    return EncodedExample(
        encode_prompt(tokenizer, example.input),
        [*tokenizer.encode(example.output, add_special_tokens=False), int(eos)],
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_tokens: int,
    source: str = "data",
) -> list[EncodedExample]:
    """Tokenize; an example longer than ``max_tokens`` (the context left after the prefix)
    is an error naming its position, not a silent truncation."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidInputError("the tokenizer has no EOS token")
    encoded = []
    for number, example in enumerate(examples, start=1):
        item = encode_example(tokenizer, example)
        if len(item) > max_tokens:
            raise InvalidInputError(
                f"{source}: example {number} has {len(item)} tokens; the limit is {max_tokens} "
                "(the model's context minus the prefix length)"
            )
        encoded.append(item)
    return encoded


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens
    labels: torch.Tensor  # (B, T) next-token targets, IGNORE_INDEX where no loss

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def collate(examples: Sequence[EncodedExample], *, pad_id: int) -> Batch:
    longest = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.target_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # labels[t] is the token predicted at position t, i.e. ids[t + 1]; only output tokens.
        start = len(example.prompt_ids) - 1
        labels[row, start : len(ids) - 1] = torch.tensor(example.target_ids)
    return Batch(input_ids, attention_mask, labels)
