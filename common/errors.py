"""Errors a user can fix. The CLI and the API print their message (never a traceback)
and map them to an exit code or HTTP status."""

from __future__ import annotations


class PrefixdError(Exception):
    """Base class of every error whose message is meant for a user."""

    exit_code = 2


class InvalidInputError(PrefixdError):
    """Bad data or bad arguments: the message names the file, line, field or limit."""


class ModelNotFoundError(PrefixdError):
    """The base model cannot be found or loaded; the message names the install step."""


class IncompatiblePrefixError(PrefixdError):
    """A prefix was made for another base model or is malformed."""


class DecodingFailedError(PrefixdError):
    """One request's decoding could not go on (its scores are not finite, or sampling from
    them failed); the requests it shared a batch with are not affected."""
