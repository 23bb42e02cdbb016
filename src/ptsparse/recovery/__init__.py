"""Recovery axis: what happens after masking (BatchNorm re-calibration; training-based recovery builds here)."""

from .batchnorm import recalibrate_batchnorm

__all__ = ["recalibrate_batchnorm"]
