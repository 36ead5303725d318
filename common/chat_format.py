"""Chat messages → the prompt text the model reads, and stop sequences.

A model whose tokenizer has a chat template gets its own template (with the generation
prompt for the assistant's turn), exactly as ``transformers`` renders it. A model without
one gets a documented plain format, one line per message and an open assistant turn::

    system: You are terse.
    user: Name a colour.
    assistant:

Example::

    render_chat(tokenizer, [{"role": "user", "content": "hi"}])   # → the prompt text
    cut_at_stop("red. blue.", ["."])                                # → ("red", True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.errors import InvalidInputError

ROLES = ("system", "developer", "user", "assistant")


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """``messages``: ``{"role", "content"}`` dicts, roles in :data:`ROLES`, content text."""
    if getattr(tokenizer, "chat_template", None):
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        normalized = [
            {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
            for m in messages
        ]
        try:
            rendered = tokenizer.apply_chat_template(
                normalized, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # a template may refuse (e.g. "roles must alternate")
            message = str(error)[:300] or type(error).__name__
            raise InvalidInputError(
                f"the model's chat template refused these messages: {message}"
            ) from None
        return str(rendered)
    lines = [
        f"{'system' if m['role'] == 'developer' else m['role']}: {m['content']}" for m in messages
    ]
    return "\n".join([*lines, "assistant:"])


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop sequence (which is not returned), and whether one
    was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopStreamer:
    """Streams text deltas, holding back what could still become a stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The text that is safe to send now ("" once a stop sequence was seen)."""
        if self.stopped:
            return ""
        self.pending += delta
        text, found = cut_at_stop(self.pending, self.stops)
        if found:
            self.stopped, self.pending = True, ""
            return text
        ready = len(self.pending) - self.hold
        if ready <= 0:
            return ""
        out, self.pending = self.pending[:ready], self.pending[ready:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
