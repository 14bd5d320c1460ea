"""Errors and small checks shared by every layer; the leaf of the import graph: it imports nothing of ours.

A run refuses input it cannot use with :class:`ConfigError`, whose message is one sentence that ``ksd-run``
prints as it is (exit status 2). The schemas (:mod:`ksd.config`), the registries (data, models,
optimizers) and the library API raise it alike, so it lives below all of them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration a run cannot use; the message is one sentence meant for the user."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), to quote in a one-line error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
