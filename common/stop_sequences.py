"""Stop sequences: text that ends a row's decoding, and is not returned, with what follows.

The decode loop asks :class:`StopChecker` after every token whether the row's decoded text
(``skip_special_tokens``, as it is returned) now contains one of the row's stop sequences,
and ends the row there, so it frees its batch slot and spends no more tokens. The text is
then cut before the earliest stop sequence (:func:`cut_at_stop`). A stream sends only text
that can no longer turn out to be part of a stop sequence (:class:`StopStreamer` holds back
the longest end of the text that is the start of one).

Example::

    cut_at_stop("red. blue.", ["."])        # → ("red", True)
    streamer = StopStreamer(["END"])
    streamer.feed("abcE"), streamer.feed("ND!")   # → ("abc", ""): "E" waited, then it stopped
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.errors import InvalidInputError

# OpenAI's bounds: up to 4 stop sequences; each non-empty, and (ours) at most this long.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 200


def validate_stops(stops: Sequence[str]) -> None:
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidInputError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
    for number, stop in enumerate(stops, start=1):
        if not isinstance(stop, str) or not stop:
            raise InvalidInputError(f"stop sequence {number} must be a non-empty string")
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidInputError(
                f"stop sequence {number} has {len(stop)} characters; the limit is {MAX_STOP_CHARS}"
            )


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop sequence (which is not returned), and whether one
    was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopChecker:
    """Whether a row's generated ids decode to text containing one of its stop sequences.
    The whole text is decoded every time (a token's text can depend on its neighbours, and
    a stop sequence may span tokens): a few microseconds per hundred tokens."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]

    def __call__(self, ids: Sequence[int]) -> bool:
        text = str(self.tokenizer.decode(list(ids), skip_special_tokens=True))
        return any(stop in text for stop in self.stops)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` are the start of some stop sequence (and
    so may still become one)."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class StopStreamer:
    """Streams text deltas, holding back what could still become a stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
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
        ready = len(self.pending) - _held_back(self.pending, self.stops)
        out, self.pending = self.pending[:ready], self.pending[ready:]
        return out

    def flush(self) -> str:
        """What was held back, once no more text comes (it did not become a stop sequence)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
