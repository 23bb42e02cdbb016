"""UniPTS's reducing-regrowing search for per-layer sparsity (Xie et al., CVPR 2024; ``unipts.md`` §3).

*Reduce*: every layer goes to ``P + delta``. *Regrow*: a genome ``g`` (one gene per layer) gives the
shares ``softmax(g)`` of the ``delta * N`` weights handed back. A small genetic algorithm searches the
genomes; each candidate is decoded exactly onto the global target (§3.2, water-filling layers that would
pass full density), magnitude-pruned on the dense weights, its BatchNorm statistics re-estimated on one
calibration slice, and scored on a *disjoint* held-out slice against the dense model. Searching only
``delta * N`` weights and scoring on held-out images are the two guards against fitting the small
calibration set.

The fitness is end to end (the KL of the whole model's outputs to the dense model's, not a sum of layer
errors), and a candidate's magnitude masks see no data; only BatchNorm statistics are fitted to calibration
samples. So a model without BatchNorm (a language model) takes no BatchNorm slice: the fitness scores
``fit_samples`` windows drawn from the whole calibration sample, and the rest are what ``rescore_top``
distils on.

Our readings (``unipts.md`` §3.3-3.4, small budget): population 16, 8 generations, 6 parents, 2 elites carried
over, best-ever returned, duplicates replaced by fresh random genomes, fitness cached by genome; label-free
``kd`` fitness by default. Besides the uniform-regrowth anchor the authors use, ERK is scored once as one
more candidate, so the search never returns an allocation worse than ERK on its own fitness.

One-shot fitness does not predict accuracy after distillation (the searched genome beats ERK on fitness and then
loses after recovery). ``rescore_top`` (off by default: the paper's form) re-scores the best distinct candidates and
ERK after ``rescore_steps`` of logit distillation each, masks held, and returns the best of those.

Data-parallel (:mod:`ptsparse.distributed`): the ranks share the candidates, not the samples. Each generation's
new candidates (and the re-scored finalists) are dealt out in turn; each rank scores its own on the whole BN and
held-out slices, alone, and the scores are gathered in candidate order (:func:`~ptsparse.distributed.computed_in_turns`),
so every rank breeds the same next generation and returns the single process's allocation.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import distributed
from .._progress import progress
from ..data import Calibration
from ..errors import ConfigError
from ..norms import BATCH_NORMS
from ..options import Options, option
from .base import ALLOCATIONS, Allocation, AllocationContext, LayerBudget, exact_counts, target_count
from .erk import ERK

log = logging.getLogger(__name__)

FITNESSES = ("kd", "agreement", "top1_labels")


def decode(genome: torch.Tensor, layers: Sequence[LayerBudget], sparsity: float, delta: float) -> dict[str, float]:
    """Per-layer sparsity of a genome, meeting ``sparsity`` exactly before rounding (``unipts.md`` §3.2).

    Every layer starts at density ``b = 1 - sparsity - delta`` and the ``K - b N`` weights above that are
    shared by ``softmax(genome)``; a layer pushed past full density is set full and the shares are
    re-solved among the others.
    """
    sizes = torch.tensor([float(layer.numel) for layer in layers], dtype=torch.float64)
    total = float(sizes.sum())
    keep = (1.0 - sparsity) * total
    base = 1.0 - sparsity - min(delta, 1.0 - sparsity)
    shares = torch.softmax(genome.double(), 0)
    full = torch.zeros(len(layers), dtype=torch.bool)
    while True:
        rest = keep - float(sizes[full].sum()) - base * float(sizes[~full].sum())
        density = torch.ones(len(layers), dtype=torch.float64)
        free_shares = shares[~full] / shares[~full].sum()
        density[~full] = base + rest * free_shares / sizes[~full]
        newly_full = (density >= 1.0) & ~full
        if not newly_full.any():
            break
        full |= newly_full
    return {layer.name: float(1.0 - min(d, 1.0)) for layer, d in zip(layers, density.tolist())}


@dataclass
class _Candidate:
    label: str
    counts: dict[str, int]
    fitness: float
    secondary: float = 0.0

    @property
    def key(self) -> tuple[float, float]:
        return self.fitness, self.secondary


class FitnessEvaluator:
    """Scores an allocation: magnitude masks on the dense weights, BN re-estimated on one slice, fitness on
    another (held out), against the dense model's outputs there. One working copy of the model is reused.

    Args:
        context: the dense model, its targets and the calibration data.
        fitness: ``"kd"`` (minus the KL from the dense outputs at ``temperature``), ``"agreement"`` (share of
            held-out samples with the dense model's top-1, ties broken by kd) or ``"top1_labels"`` (accuracy
            on the calibration labels, as the authors' code).
        bn_samples, fit_samples: sizes of the two disjoint, seeded slices (without BatchNorm in the model:
            ``fit_samples`` scored, the rest of the sample in the other slice).
        seed: seeds the slices and the order of the short distillation of :meth:`after_distillation`.
    """

    def __init__(self, context: AllocationContext, fitness: str = "kd", bn_samples: int = 256,
                 fit_samples: int = 256, temperature: float = 4.0, seed: int = 0) -> None:
        calibration = context.calibration
        if len(calibration) < 2:
            raise ConfigError("allocation 'unipts_search' needs at least 2 calibration samples")
        if not any(isinstance(module, BATCH_NORMS) for module in context.model.modules()):
            # Nothing to re-estimate (a language model): the fitness scores ``fit_samples`` of the whole sample,
            # the rest is the slice ``after_distillation`` trains on.
            fit_samples = min(fit_samples, len(calibration))
            bn_samples = len(calibration) - fit_samples
        elif bn_samples + fit_samples > len(calibration):
            bn_samples = len(calibration) // 2
            fit_samples = len(calibration) - bn_samples
        if fitness == "top1_labels" and calibration.labels is None:
            raise ConfigError("search_fitness 'top1_labels' needs labelled calibration data; use kd or agreement")
        order = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(seed))
        self.bn_slice = _subset(calibration, order[:bn_samples])
        self.fit_slice = _subset(calibration, order[bn_samples: bn_samples + fit_samples])
        self.fitness, self.temperature = fitness, temperature
        self.batch_size, self.device = context.batch_size, context.device
        self.model = copy.deepcopy(context.model)
        modules = dict(self.model.named_modules())
        self.layers = {t.name: modules[t.name] for t in context.targets}
        self.dense = {name: m.weight.detach().clone() for name, m in self.layers.items()}
        self.initial_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.teacher, self.seed = context.model, seed
        self.order = {name: torch.sort(w.abs().flatten(), stable=True).indices for name, w in self.dense.items()}
        self.dense_logits = self._logits(context.model)
        self.evaluations = 0

    @torch.no_grad()
    def _logits(self, model) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return torch.cat([model(x.to(self.device)).float().cpu() for x, _ in self.fit_slice.batches(self.batch_size)])
        finally:
            model.train(was_training)

    @torch.no_grad()
    def _prune(self, counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """The dense model with the ``counts[name]`` smallest weights of each layer zeroed; returns the kept masks."""
        self.model.load_state_dict(self.initial_state)
        kept = {}
        for name, module in self.layers.items():
            weight = self.dense[name].clone().flatten()
            weight[self.order[name][: counts[name]]] = 0
            module.weight.copy_(weight.view_as(module.weight))
            kept[name] = module.weight != 0
        return kept

    def __call__(self, counts: Mapping[str, int]) -> tuple[float, float]:
        """``(fitness, tie-breaker)`` of the allocation pruning ``counts[name]`` weights per layer."""
        self._prune(counts)
        return self._score()

    def after_distillation(self, counts: Mapping[str, int], steps: int, lr: float = 0.01) -> tuple[float, float]:
        """The fitness after ``steps`` of logit distillation on the BatchNorm slice (SGD with momentum, masks held,
        teacher in eval mode): closer to what a candidate is worth after recovery than its one-shot fitness."""
        if len(self.bn_slice) == 0:
            raise ConfigError(f"unipts_search_rescore_top distils on calibration samples outside the "
                              f"{len(self.fit_slice)} the fitness scores, and none are left; give more samples or a "
                              f"unipts_search_fit_samples below {len(self.fit_slice)}")
        kept = self._prune(counts)
        optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
        generator = torch.Generator().manual_seed(self.seed)
        inputs = self.bn_slice.inputs
        teacher_was_training = self.teacher.training
        self.model.train()
        self.teacher.eval()
        try:
            for _ in range(steps):
                x = inputs[torch.randint(len(inputs), (min(self.batch_size, len(inputs)),), generator=generator)]
                x = x.to(self.device)
                with torch.no_grad():
                    teacher = self.teacher(x)
                loss = self._kl(self.model(x), teacher)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for name, module in self.layers.items():
                        module.weight.mul_(kept[name])
        finally:
            self.model.eval()
            self.teacher.train(teacher_was_training)  # the context's model is the caller's: left as it was
        return self._score()

    def _kl(self, logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """KL from ``reference``'s softened outputs to ``logits``' at the fitness temperature, summed over classes
        (the last dimension) and averaged over the rest: samples, and a language model's token positions."""
        return F.kl_div(F.log_softmax(logits.flatten(0, -2) / self.temperature, -1),
                        F.log_softmax(reference.flatten(0, -2) / self.temperature, -1),
                        reduction="batchmean", log_target=True)

    @torch.no_grad()
    def _score(self) -> tuple[float, float]:
        from ..recovery.batchnorm import recalibrate_batchnorm

        recalibrate_batchnorm(self.model, self.bn_slice, self.batch_size, self.device, shard=False)
        logits = self._logits(self.model)
        self.evaluations += 1
        kl = float(self._kl(logits, self.dense_logits))
        if self.fitness == "kd":
            return -kl, 0.0
        if self.fitness == "agreement":
            return float((logits.argmax(-1) == self.dense_logits.argmax(-1)).float().mean()), -kl
        return float((logits.argmax(-1) == self.fit_slice.labels).float().mean()), -kl


def _subset(calibration: Calibration, index: torch.Tensor) -> Calibration:
    labels = calibration.labels[index] if calibration.labels is not None else None
    return Calibration(calibration.inputs[index], labels, calibration.hash)


@ALLOCATIONS.register("unipts_search")
class ReducingRegrowingSearch(Allocation):
    """Genetic search over how ``delta * N`` regrown weights are shared between layers.

    Args:
        delta: the excess sparsity every layer is reduced to before regrowing (0.05).
        population, generations, parents, elites: GA sizes (16, 8, 6, 2 by default).
        mutation: probability per gene of ``g <- g * (1 + N(0, 1))``.
        fitness, bn_samples, fit_samples, temperature: see :class:`FitnessEvaluator`.
        seed: seeds the slices and every random choice of the search.
        show_progress: a progress bar over generations.
    """

    @dataclass(frozen=True)
    class Settings(Options, part="unipts_search"):
        delta: float = option(0.05, "every layer is reduced to sparsity + delta, then delta * N weights are "
                              "regrown by search", minimum=0, maximum=1, open_maximum=True)
        population: int = option(16, "genomes per generation", minimum=1)
        generations: int = option(8, "generations", minimum=0)
        parents: int = option(6, "best genomes that breed", minimum=1)
        elites: int = option(2, "best genomes carried over unchanged", minimum=0)
        mutation: float = option(0.1, "mutation probability per gene", minimum=0, maximum=1)
        fitness: str = option("kd", "kd (KL to the dense outputs), agreement (same top-1) or top1_labels (needs "
                              "labels)", choices=FITNESSES)
        temperature: float = option(4.0, "softmax temperature of the kd fitness", minimum=0)
        bn_samples: int = option(256, "calibration samples that re-estimate BatchNorm for each candidate",
                                 minimum=1)
        fit_samples: int = option(256, "held-out calibration samples (disjoint from the BN ones) that score each "
                                  "candidate", minimum=1)
        rescore_top: int = option(0, "re-score the best N distinct candidates and ERK after a short distillation "
                                  "each and return the best of those (0: the one-shot fitness decides, the paper's)",
                                  minimum=0)
        rescore_steps: int = option(100, "distillation steps of each re-scored candidate", minimum=1)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.delta == 0:
                raise ConfigError(f"unipts_search_delta must be in (0, 1), got {self.delta}")
            if not (2 <= self.parents <= self.population and self.elites < self.population
                    and self.population >= 4):
                raise ConfigError(f"search sizes do not fit: population {self.population} (>= 4), parents "
                                  f"{self.parents} (2..population), elites {self.elites} (< population)")

    needs_context = True
    offloadable = False  # evaluates candidates on a copy of the whole model
    patterns = ("unstructured",)

    def __init__(self, delta: float = 0.05, population: int = 16, generations: int = 8, parents: int = 6,
                 elites: int = 2, mutation: float = 0.1, fitness: str = "kd", bn_samples: int = 256,
                 fit_samples: int = 256, rescore_top: int = 0, rescore_steps: int = 100, temperature: float = 4.0,
                 seed: int = 0, show_progress: bool = False) -> None:
        self.Settings(delta, population, generations, parents, elites, mutation, fitness, temperature, bn_samples,
                      fit_samples, rescore_top, rescore_steps)
        self.rescore_top, self.rescore_steps = rescore_top, rescore_steps
        self.delta, self.population, self.generations = delta, population, generations
        self.parents, self.elites, self.mutation = parents, elites, mutation
        self.fitness, self.bn_samples, self.fit_samples = fitness, bn_samples, fit_samples
        self.temperature, self.seed, self.show_progress = temperature, seed, show_progress
        self.report: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config) -> ReducingRegrowingSearch:
        return cls(**config.settings_of(cls).to_dict(), seed=config.seed, show_progress=config.progress)

    def allocate(self, layers: Sequence[LayerBudget], sparsity: float,
                 scores: Mapping[str, torch.Tensor] | None = None,
                 context: AllocationContext | None = None) -> dict[str, float]:
        if context is None:
            raise ConfigError("allocation 'unipts_search' needs the model and calibration data (an AllocationContext)")
        start = time.perf_counter()
        # Keep at least one weight per layer (a fully pruned layer disconnects the network).
        layers = [LayerBudget(l.name, l.shape, min(l.cap, (l.numel - 1) / l.numel), l.unit) for l in layers]
        wanted = target_count(layers, sparsity)
        evaluate = FitnessEvaluator(context, self.fitness, self.bn_samples, self.fit_samples, self.temperature,
                                    self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        cache: dict[bytes, _Candidate] = {}
        anchor = torch.zeros(len(layers), dtype=torch.float64)  # uniform regrowth

        def score(genomes: list[torch.Tensor], *others: tuple[str, dict[str, int]]) -> list[_Candidate]:
            """Caches the candidates of ``genomes`` not scored before, scoring them with ``others`` (label, counts)
            across the ranks; returns the candidates of ``others``."""
            fresh: dict[bytes, tuple[str, dict[str, int]]] = {}
            for genome in genomes:
                key = genome.numpy().tobytes()
                if key not in cache and key not in fresh:
                    fresh[key] = ("uniform regrowth" if torch.equal(genome, anchor) else "genome",
                                  exact_counts(layers, decode(genome, layers, sparsity, self.delta), wanted))
            pending = [*others, *fresh.values()]
            results = distributed.computed_in_turns([counts for _, counts in pending], evaluate, 2)
            scored = [_Candidate(label, counts, *result) for (label, counts), result in zip(pending, results)]
            cache.update(zip(fresh, scored[len(others):]))
            return scored[: len(others)]

        def random_genome() -> torch.Tensor:
            return torch.rand(len(layers), generator=generator, dtype=torch.float64)

        population = [anchor] + [random_genome() for _ in range(self.population - 1)]
        erk, = score(population, ("erk", exact_counts(layers, ERK().allocate(layers, sparsity), wanted)))
        fitness = {id(g): cache[g.numpy().tobytes()] for g in population}
        best = max([erk, *fitness.values()], key=lambda c: c.key)
        history = [best.fitness]
        crossovers = (self.population - self.elites) // 2
        for _ in progress(range(self.generations), self.show_progress, "unipts search"):
            ranked = sorted(population, key=lambda g: fitness[id(g)].key, reverse=True)
            parents = ranked[: self.parents]
            children = list(ranked[: self.elites])
            if not any(torch.equal(anchor, g) for g in children):
                children.append(anchor)
            while len(children) < self.elites + crossovers:
                a, b = torch.randperm(len(parents), generator=generator)[:2].tolist()
                pick = torch.rand(len(layers), generator=generator) < 0.5
                children.append(torch.where(pick, parents[a], parents[b]))
            while len(children) < self.population:
                parent = parents[int(torch.randint(len(parents), (1,), generator=generator))]
                mutate = torch.rand(len(layers), generator=generator) < self.mutation
                noise = torch.randn(len(layers), generator=generator, dtype=torch.float64)
                children.append(torch.where(mutate, parent * (1 + noise), parent))
            seen: set[bytes] = set()
            for index, child in enumerate(children):
                while child.numpy().tobytes() in seen:
                    child = random_genome()
                children[index] = child
                seen.add(child.numpy().tobytes())
            population = children
            score(population)
            fitness = {id(g): cache[g.numpy().tobytes()] for g in population}
            best = max([best, *fitness.values()], key=lambda c: c.key)
            history.append(best.fitness)
        anchor_fitness = cache[anchor.numpy().tobytes()].fitness
        rescored = self._rescore(evaluate, [erk, *cache.values()]) if self.rescore_top else []
        if rescored:
            best = max(rescored, key=lambda pair: pair[1])[0]
        evaluations = int(distributed.all_reduce_(torch.tensor([float(evaluate.evaluations)], dtype=torch.float64)))
        self.report = {"fitness": self.fitness, "evaluations": evaluations, "best": best.label,
                       "best_fitness": best.fitness, "erk_fitness": erk.fitness,
                       "uniform_regrowth_fitness": anchor_fitness, "best_per_generation": history,
                       "bn_samples": len(evaluate.bn_slice), "fit_samples": len(evaluate.fit_slice),
                       "wall_time_s": round(time.perf_counter() - start, 3)}
        if rescored:
            self.report["rescored"] = [{"label": c.label, "fitness": c.fitness, "after_distillation": after[0]}
                                       for c, after in rescored]
        log.info("unipts search: best %s (fitness %.5f; ERK %.5f) after %d evaluations", best.label, best.fitness,
                 erk.fitness, evaluations)
        return {l.name: best.counts[l.name] / l.numel for l in layers}

    def _rescore(self, evaluate: FitnessEvaluator,
                 candidates: list[_Candidate]) -> list[tuple[_Candidate, tuple[float, float]]]:
        """ERK and the ``rescore_top`` best distinct other candidates, each with its fitness after distillation."""
        erk, others = candidates[0], sorted(candidates[1:], key=lambda c: c.key, reverse=True)
        finalists, seen = [erk], {tuple(erk.counts.values())}
        for candidate in others:
            if len(finalists) > self.rescore_top:
                break
            if tuple(candidate.counts.values()) not in seen:
                finalists.append(candidate)
                seen.add(tuple(candidate.counts.values()))
        after = distributed.computed_in_turns(
            finalists, lambda candidate: evaluate.after_distillation(candidate.counts, self.rescore_steps), 2)
        return list(zip(finalists, after))

    def summary(self) -> dict[str, Any]:
        return dict(self.report)
