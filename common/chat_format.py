"""Chat messages → the prompt text the model reads.

A model whose tokenizer has a chat template gets its own template (with the generation
prompt for the assistant's turn), exactly as ``transformers`` renders it. A model without
one gets a documented plain format, one line per message and an open assistant turn::

    system: You are terse.
    user: Name a colour.
    assistant:

Example::

    render_chat(tokenizer, [{"role": "user", "content": "hi"}])   # → the prompt text
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
