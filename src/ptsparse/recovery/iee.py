"""IEE: iterative exploitation and exploration of masks (Sun et al., WACV 2025; ``iee.md`` §6).

Every cycle of the update period, in a space of units (single weights, or whole output channels):

1. *exploit* (``H`` steps): train the active units (masked forward);
2. *prune*: drop the ``ω`` weakest active units by the criterion;
3. *improve* (``J`` steps): train the reduced network;
4. *explore* (``Q`` steps): reactivate every pruned unit (dense forward) and train only those, with the
   active units, biases and BatchNorm affine parameters frozen, a fresh optimizer (the current learning
   rate, no weight decay), and the BatchNorm running statistics restored afterwards;
5. *grow*: re-admit the ``ω`` best explored units by the same criterion. They keep their explored values
   (most recently used) with fresh optimizer state; the others keep theirs, masked off again.

``ω`` is ``floor(ζ_t * k)`` of each layer's ``k`` active weights, ``ζ_t = α/2 (1 + cos(π t / T_end))``
(RigL's decay), so per-layer counts never change and the allocation stays exact. Channels swap a share
``ζ_t`` of the FLOPs budget instead (:mod:`ptsparse.recovery.iee_channels`). After ``T_end`` the masks
are fixed and only the active units train. Weights are stored dense: what must not move in a step (pruned
units while exploiting, active ones while exploring) is written back after it, so momentum and weight
decay never move it.

Criteria: ``magnitude`` (``|w|`` at the end of the phase, as published; a filter's norm for channels) or
``taylor`` (``|w * mean gradient|`` over the phase, a consistent first-order saliency; BatchNorm gates for
channels). Without reactivation (the ablation) growth ranks the pruned units by the criterion on their
stored values, with the gradient of the masked forward.

The report gets, per cycle, the swap size, the IoU of consecutive masks and the share of regrown units
that survive the next cycle and the run.

Data-parallel: prune and grow score the weights and the gradients of the optimizer steps, which
DistributedDataParallel has averaged over the ranks (the Taylor sums accumulate them after the backward pass), so
every rank makes the same decision; each prune and grow is checked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..allocation.knapsack import Knapsack
from ..errors import ConfigError
from ..masking import mask_of, weight_mask
from ..norms import norm_statistics, restore_norm_statistics
from ..options import Options, option
from ..patterns import lowest, pattern_kind
from ..targets import Target
from .batchnorm import average_norm_statistics
from .dynamics import DYNAMICS, Dynamics, Masks, TrainState, reset_optimizer_entries

log = logging.getLogger(__name__)

IEE_CRITERIA = ("magnitude", "taylor")

@dataclass(frozen=True)
class Cycles:
    """The update period: back-to-back cycles of ``exploit + improve + explore`` steps ending by ``end``."""

    exploit: int
    improve: int
    explore: int
    end: int

    @property
    def length(self) -> int:
        return self.exploit + self.improve + self.explore

    @property
    def count(self) -> int:
        return self.end // self.length

    def swap_fraction(self, cycle: int, alpha: float) -> float:
        """``ζ_t`` at the start of ``cycle``: cosine decay from ``alpha`` to 0 at ``end``."""
        return alpha / 2 * (1 + math.cos(math.pi * cycle * self.length / self.end))

    def phase(self, step: int) -> tuple[str, int]:
        """``("exploit" | "improve" | "explore" | "settle", cycle)`` of a step."""
        cycle, offset = divmod(step, self.length)
        if cycle >= self.count:
            return "settle", cycle
        if offset < self.exploit:
            return "exploit", cycle
        return ("improve" if offset < self.exploit + self.improve else "explore"), cycle


def _count(masks: Masks) -> int:
    return sum(int(m.sum()) for m in masks.values())


def _overlap(a: Masks, b: Masks) -> int:
    return sum(int((a[n] & b[n]).sum()) for n in a)


class WeightUnits:
    """Single weights as units: each layer prunes and grows its own ``ω``, so its count never changes."""

    def __init__(self, targets: list[Target], criterion: str) -> None:
        self.criterion = criterion
        self.modules: dict[str, nn.Module] = {}
        for target in targets:
            if mask_of(target.module) is None:
                raise ConfigError(f"dynamics 'iee' needs a mask on layer {target.name}; prune the model first")
            self.modules[target.name] = target.module
        self.active: Masks = {name: mask_of(m).clone() for name, m in self.modules.items()}
        self.gradients: Masks = {}
        self.swapped: dict[str, int] = {}

    def weight(self, name: str) -> torch.Tensor:
        return self.modules[name].parametrizations.weight.original

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight(name) for name in self.modules]

    def set_straight_through(self, on: bool) -> None:
        """Dense gradients in the masked forward, so pruned weights can be scored without reactivation."""
        for module in self.modules.values():
            weight_mask(module).straight_through = on

    @torch.no_grad()
    def show(self, dense: bool) -> None:
        """Forward with the active weights only, or with every weight (exploration)."""
        for name, module in self.modules.items():
            mask_of(module).copy_(torch.ones_like(self.active[name]) if dense else self.active[name])

    @contextmanager
    def holding(self, active: bool) -> Iterator[None]:
        """Writes the active (``True``) or the pruned (``False``) entries back after the step inside."""
        with torch.no_grad():
            where = {name: self.active[name] if active else ~self.active[name] for name in self.modules}
            held = {name: self.weight(name)[where[name]].clone() for name in self.modules}
        yield
        with torch.no_grad():
            for name in self.modules:
                self.weight(name)[where[name]] = held[name]

    @torch.no_grad()
    def accumulate(self) -> None:
        for name in self.modules:
            grad = self.weight(name).grad
            if grad is not None:
                self.gradients[name] = self.gradients.get(name, torch.zeros_like(grad)) + grad

    def clear_gradients(self) -> None:
        self.gradients = {}

    @torch.no_grad()
    def scores(self, name: str) -> torch.Tensor:
        weight = self.weight(name)
        if self.criterion == "magnitude":
            return weight.abs()
        return (weight * self.gradients.get(name, torch.zeros_like(weight))).abs()

    @torch.no_grad()
    def prune(self, fraction: float, state: TrainState) -> Masks:
        """Drops ``floor(fraction * k)`` lowest-scoring active weights per layer; returns what was dropped."""
        dropped = {}
        for name in self.modules:
            active = self.active[name]
            count = int(fraction * int(active.sum()))
            scores = self.scores(name).masked_fill(~active, float("inf"))
            drop = torch.zeros_like(active)
            drop.view(-1)[lowest(scores, count)] = True
            active &= ~drop
            reset_optimizer_entries(state.optimizer, self.weight(name), drop)
            self.swapped[name], dropped[name] = count, drop
        return dropped

    @torch.no_grad()
    def grow(self, state: TrainState) -> Masks:
        """Re-admits as many highest-scoring pruned weights per layer as :meth:`prune` dropped."""
        grown = {}
        for name in self.modules:
            active = self.active[name]
            scores = (-self.scores(name)).masked_fill(active, float("inf"))
            add = torch.zeros_like(active)
            add.view(-1)[lowest(scores, self.swapped.get(name, 0))] = True
            active |= add
            reset_optimizer_entries(state.optimizer, self.weight(name), add)
            grown[name] = add
        return grown

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "gradients": self.gradients, "swapped": self.swapped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, mask in state["active"].items():
            self.active[name].copy_(mask)
        self.gradients, self.swapped = dict(state["gradients"]), dict(state["swapped"])

    def finish(self) -> None:
        self.show(dense=False)
        self.set_straight_through(False)

    def summary(self) -> dict[str, Any]:
        return {}


@DYNAMICS.register("iee")
class ExploitExplore(Dynamics):
    """IEE mask dynamics (see the module docstring) for unstructured and channel patterns.

    Args:
        exploit_steps, improve_steps, explore_steps: ``H``, ``J``, ``Q``.
        alpha: swap fraction of the first cycle.
        end: fraction of the run after which masks are fixed.
        criterion: ``"magnitude"`` or ``"taylor"``.
        reactivate: explore the pruned units before growing (``False``: the ablation without it).
        explore_lr_scale: the exploration's learning rate as a multiple of the main one (1: the paper's).
        channels: units are whole output channels (pattern ``channel``), under a FLOPs budget.
        knapsack_cost: what the channel budget counts (``"macs"`` or ``"latency"``).
        batch_size: the batch of the latency table's timings (``knapsack_latency_batch``, else the run's).
    """

    @dataclass(frozen=True)
    class Settings(Options, part="iee"):
        exploit_steps: int = option(40, "steps H that train the active weights before each prune", minimum=1)
        improve_steps: int = option(40, "steps J that train the reduced network", minimum=1)
        explore_steps: int = option(20, "steps Q that train only the reactivated pruned units, the active ones "
                                    "frozen", minimum=1)
        alpha: float = option(0.1, "swap fraction at the first cycle; it decays by a cosine to 0 at iee_end",
                              minimum=0, maximum=1)
        end: float = option(0.65, "fraction of the run after which masks are fixed and only the active weights "
                            "train", minimum=0, maximum=1)
        criterion: str = option("magnitude", "score of prune and grow, magnitude (|w|; filter norm for channels) "
                                "or taylor (|w * mean grad| over the phase; BatchNorm gates for channels)",
                                choices=IEE_CRITERIA)
        reactivate: bool = option(True, "explore the pruned units before growing (false: grow by the criterion "
                                  "on their stored values)")
        explore_lr_scale: float = option(1.0, "learning rate of the exploration as a multiple of the main one "
                                         "(1: the paper's; larger: a stronger preview in as many steps)", minimum=0)

    patterns = ("unstructured", "channel")
    chooses_units = True
    data_parallel = True

    def __init__(self, exploit_steps: int = 40, improve_steps: int = 40, explore_steps: int = 20,
                 alpha: float = 0.1, end: float = 0.65, criterion: str = "magnitude", reactivate: bool = True,
                 explore_lr_scale: float = 1.0, channels: bool = False, knapsack_cost: str = "macs",
                 batch_size: int = 64) -> None:
        self.Settings(exploit_steps, improve_steps, explore_steps, alpha, end, criterion, reactivate, explore_lr_scale)
        self.explore_lr_scale = explore_lr_scale
        self.steps = (exploit_steps, improve_steps, explore_steps)
        self.alpha, self.end, self.criterion, self.reactivate = alpha, end, criterion, reactivate
        self.channels, self.knapsack_cost, self.batch_size = channels, knapsack_cost, batch_size
        self.units: Any = None  # WeightUnits, or ChannelUnits for the channel pattern
        self.model: nn.Module | None = None
        self.explorer: torch.optim.Optimizer | None = None
        self.explorer_state: dict[str, Any] | None = None
        self.norm_statistics: dict[str, torch.Tensor] | None = None
        self.before_prune: Masks = {}
        self.grown: list[Masks] = []
        self.cycle_log: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, config) -> ExploitExplore:
        knapsack = config.settings_of(Knapsack)
        return cls(**config.settings_of(cls).to_dict(), channels=pattern_kind(config.pattern) == "channel",
                   knapsack_cost=knapsack.cost, batch_size=knapsack.latency_batch or config.batch_size)

    def prepare(self, model: nn.Module, targets: list[Target], *, teacher: nn.Module | None = None,
                example: torch.Tensor | None = None) -> None:
        if self.channels:
            from .iee_channels import ChannelUnits

            self.units = ChannelUnits(model, targets, self.criterion, self.knapsack_cost, self.batch_size, example)
        else:
            self.units = WeightUnits(targets, self.criterion)
        self.units.set_straight_through(True)
        self.model = model

    def cycles(self, state: TrainState) -> Cycles:
        return Cycles(*self.steps, end=int(self.end * state.total_steps))

    def on_start(self, state: TrainState) -> None:
        if self.cycles(state).count == 0:
            log.warning("iee: %d steps hold no cycle of %d steps before %.0f%% of the run; the masks stay as "
                        "they are", state.total_steps, self.cycles(state).length, 100 * self.end)

    # steps ------------------------------------------------------------------------------------------
    def optimizer_step(self, state: TrainState) -> None:
        phase, _ = self.cycles(state).phase(state.step)
        if phase == "settle":
            state.optimizer.step()
            return
        if self.criterion == "taylor":
            self.units.accumulate()
        if phase == "explore" and self.reactivate:
            if self.explorer is None:  # resumed during an exploration
                self.explorer = self._new_explorer(state.optimizer)
                self.explorer.load_state_dict(self.explorer_state)
            for group in self.explorer.param_groups:
                group["lr"] = state.optimizer.param_groups[0]["lr"] * self.explore_lr_scale
            with self.units.holding(active=True):
                self.explorer.step()
        else:
            with self.units.holding(active=False):
                state.optimizer.step()

    def after_step(self, state: TrainState) -> None:
        cycles = self.cycles(state)
        cycle, offset = divmod(state.step, cycles.length)
        if cycle < cycles.count and offset == cycles.exploit:
            self._prune(cycle, cycles, state)
        elif cycle < cycles.count and offset == cycles.exploit + cycles.improve and self.reactivate:
            self._begin_exploration(state)
        elif offset == 0 and 1 <= cycle <= cycles.count:
            self._grow(cycle - 1, state)

    def _prune(self, cycle: int, cycles: Cycles, state: TrainState) -> None:
        self.before_prune = {name: mask.clone() for name, mask in self.units.active.items()}
        fraction = cycles.swap_fraction(cycle, self.alpha)
        dropped = self.units.prune(fraction, state)
        distributed.same_on_every_rank(self.units.active.values(), f"iee masks after the prune of cycle {cycle}")
        self.units.show(dense=False)
        self.units.clear_gradients()
        self.cycle_log.append({"cycle": cycle, "step": state.step, "swap_fraction": round(fraction, 6),
                               "swapped": _count(dropped), "_dropped": dropped})

    def _begin_exploration(self, state: TrainState) -> None:
        average_norm_statistics(self.model)  # restored after it, and checkpointed meanwhile: the same on every rank
        self.norm_statistics = norm_statistics(self.model)
        self.explorer = self._new_explorer(state.optimizer)
        self.units.show(dense=True)
        self.units.clear_gradients()

    def _new_explorer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The main optimizer's kind and settings, fresh state, no weight decay, over the units only."""
        return type(optimizer)(self.units.parameters(), **{**optimizer.defaults, "weight_decay": 0.0})

    def _end_exploration(self) -> None:
        if self.norm_statistics is not None:
            restore_norm_statistics(self.model, self.norm_statistics)
        self.norm_statistics, self.explorer, self.explorer_state = None, None, None

    def _grow(self, cycle: int, state: TrainState) -> None:
        grown = self.units.grow(state)
        distributed.same_on_every_rank(self.units.active.values(), f"iee masks after the growth of cycle {cycle}")
        self._end_exploration()
        self.units.show(dense=False)
        self.units.clear_gradients()
        active = self.units.active
        entry = self.cycle_log[-1]
        dropped = entry.pop("_dropped")
        entry["grown"] = _count(grown)
        kept_through = _overlap(self.before_prune, active)
        entry["iou"] = kept_through / max(1, _count(self.before_prune) + _count(active) - kept_through)
        entry["regrown_just_pruned"] = _overlap(grown, dropped) / max(1, _count(grown))
        if self.grown:
            self.cycle_log[-2]["survival_next"] = _overlap(self.grown[-1], active) / max(1, _count(self.grown[-1]))
        self.grown.append(grown)

    def on_end(self, state: TrainState) -> None:
        self._end_exploration()
        self.units.finish()
        for entry, grown in zip(self.cycle_log, self.grown):
            entry["survival_end"] = _overlap(grown, self.units.active) / max(1, _count(grown))

    # checkpoint and report ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"units": self.units.state_dict(), "explorer": self.explorer.state_dict() if self.explorer else None,
                "norm_statistics": self.norm_statistics, "before_prune": self.before_prune, "grown": self.grown,
                "cycle_log": self.cycle_log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.units.load_state_dict(state["units"])
        self.norm_statistics, self.before_prune = state["norm_statistics"], dict(state["before_prune"])
        self.grown, self.cycle_log = list(state["grown"]), list(state["cycle_log"])
        self.explorer, self.explorer_state = None, state["explorer"]

    def summary(self) -> dict[str, Any]:
        cycles = [{k: v for k, v in entry.items() if not k.startswith("_")} for entry in self.cycle_log]
        explore_steps = self.steps[2] * len(cycles) if self.reactivate else 0
        return {"iee_criterion": self.criterion, "iee_reactivate": self.reactivate, "iee_cycles": cycles,
                "iee_dense_steps": explore_steps, **self.units.summary()}
