"""One registry helper for every extension point: scores, interventions, metrics, condition kinds.

A :class:`Registry` is a ``dict`` of name -> entry with the checks and messages the
extension points share: names are non-empty strings, a taken name is refused unless
``overwrite=True``, and an unknown name raises :class:`~cna_lens.errors.CNAError` listing
the registered ones and how to add one. ``registry.view`` is the read-only mapping a module
exports (``cna_lens.SCORES``, ``cna_lens.INTERVENTIONS``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType
from typing import Generic, TypeVar

from cna_lens.errors import CNAError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Named entries of one kind.

    Args:
        kind: What the entries are, for messages ("score", "intervention", ...).
        how: How a user adds one, for the unknown-name message
            (e.g. "cna_lens.register_score(name, fn)").
        entries: The built-in entries.
    """

    def __init__(self, kind: str, how: str, entries: Iterable[tuple[str, T]] = ()):
        super().__init__(entries)
        self.kind = kind
        self.how = how

    @property
    def view(self) -> MappingProxyType[str, T]:
        """A read-only live view of the entries."""
        return MappingProxyType(self)

    def add(self, name: str, entry: T, *, overwrite: bool = False) -> T:
        """Register ``entry`` under ``name`` and return it.

        Re-registering the very same entry under its name is allowed.

        Raises:
            CNAError: an empty name, or a taken one (unless ``overwrite``).
        """
        if not isinstance(name, str) or not name.strip():
            raise CNAError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self and not overwrite and self[name] is not entry:
            raise CNAError(
                f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
            )
        self[name] = entry
        return entry

    def lookup(self, name: object) -> T:
        """The entry registered as ``name``.

        Raises:
            CNAError: unknown name (the message lists the registered ones).
        """
        if isinstance(name, str) and name in self:
            return self[name]
        raise CNAError(
            f"unknown {self.kind} {name!r}; valid {self.kind}s: {sorted(self)} "
            f"(or register one with {self.how})"
        )
