"""Method presets (see ``ptsparse list methods``): each picks one option on every axis."""

from .base import METHODS
from . import fcpts, iee, magnitude, magnitude_kd, pot, recommended, sparsegpt, taylor, unipts, wanda  # noqa: F401  registers the presets

__all__ = ["METHODS"]
