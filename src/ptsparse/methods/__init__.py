"""Method presets (see ``ptsparse list methods``)."""

from .base import METHODS
from . import magnitude  # noqa: F401  registers the preset

__all__ = ["METHODS"]
