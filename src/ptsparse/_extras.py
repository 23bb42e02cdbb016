"""Optional packages, imported only when a feature needs them: torch-pruning (coupled channels), the export
formats' packages and the model zoos'.

The core package imports without them; ``pip install 'ptsparse[export]'`` installs torch-pruning and the export ones.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import PtsparseError

# import name -> distribution name on PyPI
_DISTRIBUTIONS = {
    "torch_pruning": "torch-pruning",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
}


class MissingExtraError(PtsparseError, ImportError):
    """A feature needs an optional package that is not installed."""


def require(module: str, feature: str, extra: str = "export") -> ModuleType:
    """Imports ``module`` or raises an error naming the ``pip install`` command.

    Args:
        module: import name, e.g. ``"torch_pruning"``.
        feature: what needs it, for the message (``"channel removal"``).
        extra: the ptsparse extra that installs it (``export``, ``vision``, ``timm``, ``hf``).

    Raises:
        MissingExtraError: the package is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = _DISTRIBUTIONS.get(module, module)
        raise MissingExtraError(
            f"{feature} needs the package {package!r}, which is not installed; run: pip install 'ptsparse[{extra}]'"
        ) from None
