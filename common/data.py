"""Training examples: JSONL parsing with line-precise errors, tokenization, batching.

A dataset is JSONL, one object a line (blank lines are ignored), in any of three shapes:

- ``{"input": str, "output": str}``;
- ``{"prompt": str, "completion": str}`` (OpenAI's legacy fine-tuning format, the same pair);
- ``{"messages": [{"role", "content", "weight"?}, ...]}`` (OpenAI's chat fine-tuning
  format; roles ``system``, ``developer``, ``user``, ``assistant``).

An example becomes ``input <sep> output <eos>``: ``<sep>`` is the tokenizer's BOS token
(EOS when it has none). The model learns ``log p(output, eos | prefix, input)``: input
tokens, the separator and padding carry no loss (label ``-100``). A chat prompt takes no
separator: the template's generation prompt (``assistant:`` in the plain format) already
opens the answer, so the model reads exactly the standard template, as a prefix or adapter
trained elsewhere on chat data expects.

A chat line becomes **one example per assistant message** (``weight`` 1, the default; an
assistant message with ``weight`` 0 is context only): its input is the conversation before
that message rendered with the base model's chat template (``common/chat_format.py``,
exactly what ``/v1/chat/completions`` renders for the same messages, so a prefix trained on
chat data is served through the same template), its output the message's content. So the
loss is on assistant tokens only, every turn sees the whole conversation before it, and an
example is byte for byte what the chat route later feeds the model. (One sequence with a
mask over every assistant turn would be cheaper, but a template may render an earlier
assistant turn differently from the ``output <eos>`` a served answer follows.)

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

from common.chat_format import ROLES, render_chat
from common.errors import InvalidInputError

IGNORE_INDEX = -100

# A line of chat data: at most this many messages (OpenAI's chat route takes as many).
MAX_CHAT_MESSAGES = 256


@dataclass(frozen=True)
class Example:
    """``input`` → ``output``. A chat example also keeps ``context``, the ``(role, content)``
    messages before its assistant message: the model reads them through the chat template
    (:meth:`prompt`), and ``input`` is their plain rendering (what a model without a template
    reads), so an example always has a readable, comparable input."""

    input: str
    output: str
    context: tuple[tuple[str, str], ...] | None = None

    def prompt(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """The text the model reads before the separator."""
        if self.context is None:
            return self.input
        return render_chat(tokenizer, [{"role": r, "content": c} for r, c in self.context])


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]  # input tokens + separator (a chat: the rendered template alone)
    target_ids: list[int]  # output tokens + eos

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)

    @property
    def longest_side(self) -> int:
        """Encoder-decoder: the longer of the encoder input and the decoder sequence."""
        return max(len(self.prompt_ids), len(self.target_ids))


def parse_jsonl_line(raw: str | bytes, *, where: str) -> list[Example]:
    """One JSONL line → its examples: none for a blank line, one for a pair, one per trained
    assistant message for a chat; an error names ``where`` (e.g. ``data.jsonl:3``)."""
    try:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"{where}: not valid UTF-8 ({error.reason})") from None
    if not line.strip():
        return []
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{where}: invalid JSON ({error.msg})") from None
    except RecursionError:  # e.g. [[[[…]]]]: the parser gives up before it is invalid
        raise InvalidInputError(f"{where}: invalid JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise InvalidInputError(
            f'{where}: expected an object {{"input": ..., "output": ...}} or '
            f'{{"messages": [...]}}, got {type(record).__name__}'
        )
    if "messages" in record:
        if {"input", "output", "prompt", "completion"} & set(record):
            raise InvalidInputError(
                f"{where}: use one of input/output, prompt/completion or messages"
            )
        return _chat_examples(record["messages"], where=where)
    # OpenAI's legacy fine-tuning shape is the same pair under other names.
    fields = ("prompt", "completion") if "input" not in record and "prompt" in record else None
    if fields is not None and "output" in record:
        raise InvalidInputError(f"{where}: use either input/output or prompt/completion")
    fields = fields or ("input", "output")
    for name in fields:
        if name not in record:
            raise InvalidInputError(f"{where}: missing field {name!r}")
        _check_text(record[name], where=where, what=f"field {name!r}")
    return [Example(record[fields[0]], record[fields[1]])]


def _check_text(value: object, *, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidInputError(f"{where}: {what} is empty")
    try:  # a JSON escape can make a lone surrogate, which no tokenizer takes
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"{where}: {what} is not valid Unicode (a lone surrogate escape)"
        ) from None
    return value


def _message_text(content: object, *, where: str, what: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts
    (joined, as the chat route joins them)."""
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidInputError(
                    f"{where}: {what} part {index} must be "
                    f'{{"type": "text", "text": ...}} (only text is trained on)'
                )
            if not isinstance(part.get("text"), str):
                raise InvalidInputError(f"{where}: {what} part {index} has no text string")
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None:
        raise InvalidInputError(f"{where}: {what} is missing")
    return _check_text(content, where=where, what=what)


def _chat_examples(messages: object, *, where: str) -> list[Example]:
    """One example per assistant message of weight 1, its context the messages before it."""
    if not isinstance(messages, list):
        raise InvalidInputError(
            f"{where}: field 'messages' must be a list, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidInputError(f"{where}: field 'messages' is empty")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidInputError(
            f"{where}: {len(messages)} messages; the limit is {MAX_CHAT_MESSAGES}"
        )
    context: list[tuple[str, str]] = []
    examples: list[Example] = []
    for number, message in enumerate(messages, start=1):
        what = f"message {number}"
        if not isinstance(message, dict):
            raise InvalidInputError(
                f'{where}: {what} must be an object {{"role": ..., "content": ...}}, '
                f"got {type(message).__name__}"
            )
        role = message.get("role")
        if role is None:
            raise InvalidInputError(f"{where}: {what} has no 'role'")
        if role not in ROLES:
            raise InvalidInputError(
                f"{where}: {what} has role {str(role)[:40]!r}; expected one of "
                f"{', '.join(ROLES)} (tool and function messages are not trained on)"
            )
        if role == "assistant" and message.get("tool_calls"):
            raise InvalidInputError(
                f"{where}: {what} has tool_calls; only text answers are trained on"
            )
        text = _message_text(message.get("content"), where=where, what=f"{what}'s content")
        weight = message.get("weight", 1)
        if "weight" in message and role != "assistant":
            raise InvalidInputError(
                f"{where}: {what} has a weight, which only assistant messages take"
            )
        if isinstance(weight, bool) or weight not in (0, 1):
            raise InvalidInputError(f"{where}: {what}'s weight must be 0 or 1, got {weight!r}")
        if role == "assistant" and weight == 1:
            plain = render_chat(None, [{"role": r, "content": c} for r, c in context])
            examples.append(Example(plain, text, tuple(context)))
        context.append((role, text))
    if not examples:
        assistants = sum(1 for m in messages if m.get("role") == "assistant")
        raise InvalidInputError(
            f"{where}: no assistant message to train on"
            + (" (every assistant message has weight 0)" if assistants else "")
        )
    return examples


def parse_jsonl(lines: Iterable[str | bytes], *, source: str) -> list[Example]:
    """Parse JSONL lines; every error names ``source`` and the 1-based line number."""
    examples: list[Example] = []
    for number, raw in enumerate(lines, start=1):
        examples.extend(parse_jsonl_line(raw, where=f"{source}:{number}"))
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
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    encoder_decoder: bool = False,
    chat: bool = False,
) -> list[int]:
    """``input <sep>`` (decoder-only) or the encoder's ``input <eos>`` (encoder-decoder);
    ``chat``: ``text`` is a rendered chat (:func:`common.chat_format.render_chat`) that ends
    with the open assistant turn, so a decoder-only model reads it as it is."""
    if chat and not encoder_decoder:
        return list(tokenizer.encode(text, add_special_tokens=False))
    if encoder_decoder:
        if tokenizer.eos_token_id is None:
            raise InvalidInputError("the tokenizer has no EOS token")
        return [*tokenizer.encode(text, add_special_tokens=False), int(tokenizer.eos_token_id)]
    return [*tokenizer.encode(text, add_special_tokens=False), separator_id(tokenizer)]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, *, encoder_decoder: bool = False
) -> EncodedExample:
    """``input <sep>`` (encoder-decoder: ``input <eos>``) as the prompt, ``output <eos>`` as
    the target; a chat example's input is its context through the chat template."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidInputError("the tokenizer has no EOS token")
    return EncodedExample(
        encode_prompt(
            tokenizer,
            example.prompt(tokenizer),
            encoder_decoder=encoder_decoder,
            chat=example.context is not None,
        ),
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
