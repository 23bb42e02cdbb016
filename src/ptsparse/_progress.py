"""One place for progress bars, so every long loop honours ``progress=False`` (and a data-parallel run shows
rank 0's alone)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], enabled: bool, desc: str, total: int | None = None) -> Iterator[T]:
    """Wraps ``iterable`` in a tqdm bar on stderr when ``enabled`` (on rank 0); otherwise returns it unchanged."""
    from .distributed import is_main

    if not (enabled and is_main()):
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True) as bar:
        yield from bar
