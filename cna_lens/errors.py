"""The package's one exception type.

Every error that ``cna_lens`` raises for bad input is a :class:`CNAError`. It subclasses
:class:`ValueError`, so callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["CNAError", "CircuitMismatchError"]


class CNAError(ValueError):
    """Bad input to cna_lens: the message names the offending value and what is valid."""


class CircuitMismatchError(CNAError):
    """A circuit was used with a model it was not made for (shape or fingerprint differ)."""
