"""Training examples: JSONL parsing with line-precise errors, tokenization, batching.

A dataset is JSONL, one ``{"input": str, "output": str}`` object a line (or OpenAI's
legacy ``{"prompt": str, "completion": str}``; blank lines are ignored). An example becomes ``input <sep> output <eos>``: ``<sep>`` is the tokenizer's
BOS token (EOS when it has none). The model learns ``log p(output, eos | prefix, input)``:
input tokens, the separator and padding carry no loss (label ``-100``).

For an encoder-decoder model (``encoder_decoder=True``) the encoder reads ``input <eos>``
and the decoder ``<decoder start> output`` with targets ``output <eos>``: every decoder
position carries a loss except padding.
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

    @property
    def longest_side(self) -> int:
        """Encoder-decoder: the longer of the encoder input and the decoder sequence."""
        return max(len(self.prompt_ids), len(self.target_ids))


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
    except RecursionError:  # e.g. [[[[…]]]]: the parser gives up before it is invalid
        raise InvalidInputError(f"{where}: invalid JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise InvalidInputError(
            f'{where}: expected an object {{"input": ..., "output": ...}}, got {type(record).__name__}'
        )
    # OpenAI's legacy fine-tuning shape is the same pair under other names.
    fields = ("prompt", "completion") if "input" not in record and "prompt" in record else None
    if fields is not None and "output" in record:
        raise InvalidInputError(f"{where}: use either input/output or prompt/completion")
    fields = fields or ("input", "output")
    for name in fields:
        if name not in record:
            raise InvalidInputError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], str):
            raise InvalidInputError(
                f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}"
            )
        if not record[name].strip():
            raise InvalidInputError(f"{where}: field {name!r} is empty")
        try:  # a JSON escape can make a lone surrogate, which no tokenizer takes
            record[name].encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(
                f"{where}: field {name!r} is not valid Unicode (a lone surrogate escape)"
            ) from None
    return Example(record[fields[0]], record[fields[1]])


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


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, *, encoder_decoder: bool = False
) -> list[int]:
    """``input <sep>`` (decoder-only) or the encoder's ``input <eos>`` (encoder-decoder)."""
    if encoder_decoder:
        if tokenizer.eos_token_id is None:
            raise InvalidInputError("the tokenizer has no EOS token")
        return [*tokenizer.encode(text, add_special_tokens=False), int(tokenizer.eos_token_id)]
    return [*tokenizer.encode(text, add_special_tokens=False), separator_id(tokenizer)]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, *, encoder_decoder: bool = False
) -> EncodedExample:
    """``input <sep>`` (encoder-decoder: ``input <eos>``) as the prompt, ``output <eos>`` as
    the target."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidInputError("the tokenizer has no EOS token")
    return EncodedExample(
        encode_prompt(tokenizer, example.input, encoder_decoder=encoder_decoder),
        [*tokenizer.encode(example.output, add_special_tokens=False), int(eos)],
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_tokens: int,
    source: str = "data",
    encoder_decoder: bool = False,
) -> list[EncodedExample]:
    """Tokenize; an example longer than ``max_tokens`` (the context left after the prefix)
    is an error naming its position, not a silent truncation. Encoder-decoder: the encoder
    input and the decoder sequence must each fit (each side holds its own prefix)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidInputError("the tokenizer has no EOS token")
    encoded = []
    for number, example in enumerate(examples, start=1):
        item = encode_example(tokenizer, example, encoder_decoder=encoder_decoder)
        if encoder_decoder and item.longest_side > max_tokens:
            side = "input" if len(item.prompt_ids) > max_tokens else "output"
            raise InvalidInputError(
                f"{source}: example {number} has {item.longest_side} {side} tokens; the limit "
                f"is {max_tokens} per side (the model's context minus the prefix length)"
            )
        if not encoder_decoder and len(item) > max_tokens:
            raise InvalidInputError(
                f"{source}: example {number} has {len(item)} tokens; the limit is {max_tokens} "
                "(the model's context minus the prefix length)"
            )
        encoded.append(item)
    return encoded


@dataclass
class Batch:
    """Decoder-only: ``input_ids``/``attention_mask``/``labels`` ``(B, T)`` over the whole
    sequence. Encoder-decoder: ``input_ids``/``attention_mask`` ``(B, Te)`` are the encoder's,
    ``decoder_input_ids``/``decoder_attention_mask``/``labels`` ``(B, Td)`` the decoder's."""

    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens
    labels: torch.Tensor  # (B, T) next-token targets, IGNORE_INDEX where no loss
    decoder_input_ids: torch.Tensor | None = None  # (B, Td) right-padded, encoder-decoder only
    decoder_attention_mask: torch.Tensor | None = None  # (B, Td)

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens the model reads: what tokens/s counts."""
        decoder = self.decoder_attention_mask
        return int(self.attention_mask.sum()) + (0 if decoder is None else int(decoder.sum()))


def collate(
    examples: Sequence[EncodedExample], *, pad_id: int, decoder_start_id: int | None = None
) -> Batch:
    """A right-padded batch; with ``decoder_start_id`` (encoder-decoder models) the prompt
    goes to the encoder and ``<decoder start> output`` to the decoder."""
    if decoder_start_id is not None:
        return _collate_encoder_decoder(examples, pad_id=pad_id, decoder_start_id=decoder_start_id)
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


def _collate_encoder_decoder(
    examples: Sequence[EncodedExample], *, pad_id: int, decoder_start_id: int
) -> Batch:
    batch = len(examples)
    source = max(len(e.prompt_ids) for e in examples)
    target = max(len(e.target_ids) for e in examples)
    input_ids = torch.full((batch, source), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, source), dtype=torch.long)
    decoder_input_ids = torch.full((batch, target), pad_id, dtype=torch.long)
    decoder_attention_mask = torch.zeros((batch, target), dtype=torch.long)
    labels = torch.full((batch, target), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        prompt, targets = example.prompt_ids, example.target_ids
        input_ids[row, : len(prompt)] = torch.tensor(prompt)
        attention_mask[row, : len(prompt)] = 1
        # Teacher forcing: the decoder reads <start> y_1 … y_{n-1} and predicts y_1 … y_n.
        decoder_input_ids[row, : len(targets)] = torch.tensor([decoder_start_id, *targets[:-1]])
        decoder_attention_mask[row, : len(targets)] = 1
        labels[row, : len(targets)] = torch.tensor(targets)
    return Batch(input_ids, attention_mask, labels, decoder_input_ids, decoder_attention_mask)
