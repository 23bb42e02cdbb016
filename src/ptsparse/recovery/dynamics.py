"""Mask dynamics: how masks move during recovery.

Contract: ``on_start(state)``, ``after_step(state)`` and ``on_end(state)`` hooks get the
:class:`TrainState` of the run; dynamics change masks only in place (so every layer keeps its
allocated count) and keep what they need to resume in ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .._registry import Registry
from ..targets import Target


@dataclass
class TrainState:
    """What a recovery run exposes to its dynamics at each hook."""

    model: nn.Module
    targets: list[Target]
    optimizer: torch.optim.Optimizer
    step: int
    total_steps: int


class Dynamics(Protocol):
    """Hooks called by the recovery trainer; see the module docstring."""

    @classmethod
    def from_config(cls, config) -> Dynamics: ...

    def on_start(self, state: TrainState) -> None: ...

    def after_step(self, state: TrainState) -> None: ...

    def on_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


DYNAMICS: Registry[type] = Registry("dynamics")


@DYNAMICS.register("static")
class Static:
    """Masks stay as the pattern chose them; only the kept weights train."""

    @classmethod
    def from_config(cls, config) -> Static:
        return cls()

    def on_start(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState) -> None:
        pass

    def on_end(self, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
