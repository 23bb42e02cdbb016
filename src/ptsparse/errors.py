"""Exception types that ptsparse raises for problems a user can fix.

Every message names the offending value and what is allowed. The CLI catches :class:`PtsparseError`
only, prints its message on one line and exits with status 2.
"""

from __future__ import annotations


class PtsparseError(Exception):
    """Base class of every error ptsparse raises on bad input or an impossible request."""


class ConfigError(PtsparseError, ValueError):
    """A configuration field holds a value outside what is allowed."""


class UnknownOptionError(ConfigError):
    """A name (method, pattern, allocation, criterion, layer, ...) is not registered."""


class IncompatibleOptionsError(ConfigError):
    """Two options are valid alone but cannot be combined."""


class CalibrationError(PtsparseError, ValueError):
    """The calibration data is missing, empty, or does not fit the model."""


class DataError(PtsparseError, FileNotFoundError):
    """A data source (files of a data set, an image folder) cannot be read."""


class CheckpointError(PtsparseError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class DistributedError(PtsparseError):
    """The ranks of a data-parallel run disagree: their calibration data, config or results differ."""


class PeerFailedError(DistributedError):
    """Another rank of a data-parallel run failed or ended, so this rank stopped too.

    Attributes:
        rank: the rank that failed, when it said so (``None``: it ended without a word, e.g. killed).
    """

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class ModelError(PtsparseError):
    """A model cannot be built, or has nothing that ptsparse can sparsify."""


class ExportError(PtsparseError):
    """A model cannot be exported in the requested format."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name if it has none): what a one-line error quotes of an
    exception raised by another library."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
