"""Method presets: a method is a registered function that returns a config, nothing else.

A preset picks one option on each axis (allocation, criterion, pattern, recovery); explicit keys
override its picks. A preset needing an algorithm of its own means a part is missing: add the part.
"""

from __future__ import annotations

from collections.abc import Callable

from .._registry import Registry

METHODS: Registry[Callable[..., object]] = Registry("method")
