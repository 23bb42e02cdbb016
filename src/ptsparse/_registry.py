"""A small name -> object registry, one instance per axis (allocation, criterion, pattern, method, ...)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from .errors import UnknownOptionError

T = TypeVar("T")


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """`` did you mean 'erk'?`` for a near miss of one of ``known``; empty when nothing is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """Maps names to the objects of one axis.

    Entries are added at import time by the axis package and read-only afterwards.

    Args:
        axis: what the entries are (``"allocation"``), used in error messages.
        ordered: names come in the order they were registered; otherwise sorted.
    """

    def __init__(self, axis: str, ordered: bool = False) -> None:
        self.axis = axis
        self.ordered = ordered
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name``."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.axis} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Returns the entry called ``name``.

        Raises:
            UnknownOptionError: no entry has that name; the message lists the known names.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownOptionError(f"unknown {self.axis} {name!r};{did_you_mean(name, self.names())} choose one of: "
                                     f"{', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._entries) if self.ordered else sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
