"""The differentiable bridge of FCPTS (``fcpts.md`` §2): a layer's sparsity as a function of its threshold.

With ``f`` the density of the layer's signed weights, the fraction of weights below a magnitude threshold
``t`` is ``s(t) = P(|w| < t) = F(t) - F(-t)``, so ``ds/dt = f(t) + f(-t)``. The forward pass uses the
exact count (the same set the strict-threshold mask prunes); the backward pass uses an estimate of
``f``, since the count itself is a step function with no useful gradient.

Two estimators of ``f``:

* :class:`HistogramDensity`: 100 equal bins over ``[min w, max w]``, as the authors' code.
* :class:`GaussianKDE`: Gaussian kernels with Silverman's bandwidth ``1.06 * std * n^(-1/5)``, as the
  paper's wording; large layers are subsampled (a fresh seeded draw per step) so it stays cheap.

Both offer ``pdf(points)`` and ``mass_within(t) = integral of f over [-t, t]``, the smoothed sparsity whose
derivative the bridge returns.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

DENSITIES = ("histogram", "kde")


class HistogramDensity:
    """Piecewise-constant density: bin value ``count_b / (n * width)``; 0 outside ``[min w, max w]``.

    Args:
        weights: the layer's weights (any shape; flattened, not modified).
        bins: number of equal-width bins.
    """

    def __init__(self, weights: torch.Tensor, bins: int = 100) -> None:
        values = weights.detach().flatten().float()
        self.low, self.high = float(values.min()), float(values.max())
        self.bins = bins
        self.width = (self.high - self.low) / bins
        if self.width > 0:
            counts = torch.histc(values, bins=bins, min=self.low, max=self.high)
            self.heights = counts / (values.numel() * self.width)
        else:  # every weight equal: a point mass, no density to speak of
            self.heights = torch.zeros(bins, device=values.device)

    def pdf(self, points: torch.Tensor) -> torch.Tensor:
        if self.width == 0:
            return torch.zeros_like(points, dtype=torch.float32)
        index = ((points.float() - self.low) / self.width).floor().long().clamp(0, self.bins - 1)
        inside = (points >= self.low) & (points <= self.high)
        return torch.where(inside, self.heights.to(points.device)[index], torch.zeros((), device=points.device))

    def _cdf(self, point: float) -> float:
        if self.width == 0:
            return float(point >= self.low)
        position = min(max((point - self.low) / self.width, 0.0), float(self.bins))
        whole = int(position)
        below = float(self.heights[:whole].sum()) * self.width
        partial = float(self.heights[whole]) * self.width * (position - whole) if whole < self.bins else 0.0
        return below + partial

    def mass_within(self, t: float) -> float:
        return self._cdf(t) - self._cdf(-t)


class GaussianKDE:
    """Gaussian kernel density estimate with Silverman's rule-of-thumb bandwidth.

    Args:
        weights: the layer's weights (flattened, not modified).
        max_samples: layers with more weights are represented by this many drawn without replacement.
        generator: the source of that draw (seeded per step by the caller, so runs are reproducible).
    """

    def __init__(self, weights: torch.Tensor, max_samples: int = 65536,
                 generator: torch.Generator | None = None) -> None:
        values = weights.detach().flatten().float()
        if values.numel() > max_samples:
            pick = torch.randperm(values.numel(), generator=generator)[:max_samples].to(values.device)
            values = values[pick]
        self.samples = values
        std = float(values.std()) if values.numel() > 1 else 0.0
        self.bandwidth = max(1.06 * std * values.numel() ** (-0.2), 1e-12)

    def pdf(self, points: torch.Tensor) -> torch.Tensor:
        z = (points.float().reshape(-1, 1) - self.samples.reshape(1, -1)) / self.bandwidth
        density = torch.exp(-0.5 * z * z).mean(1) / (self.bandwidth * math.sqrt(2 * math.pi))
        return density.reshape(points.shape)

    def mass_within(self, t: float) -> float:
        normal = torch.distributions.Normal(0.0, 1.0)
        upper = normal.cdf((t - self.samples) / self.bandwidth)
        lower = normal.cdf((-t - self.samples) / self.bandwidth)
        return float((upper - lower).mean())


def make_density(name: str, weights: torch.Tensor, *, bins: int = 100, max_samples: int = 65536,
                 generator: torch.Generator | None = None) -> HistogramDensity | GaussianKDE:
    """The estimator called ``name`` (``"histogram"`` or ``"kde"``) fitted to ``weights``."""
    if name == "histogram":
        return HistogramDensity(weights, bins)
    if name == "kde":
        return GaussianKDE(weights, max_samples, generator)
    raise ConfigError(f"density {name!r} is not allowed; choose {' or '.join(DENSITIES)}")


class _Bridge(torch.autograd.Function):
    """Forward: fraction of weights the strict mask ``|w| > t`` prunes. Backward: ``f(t) + f(-t)``."""

    @staticmethod
    def forward(ctx, threshold: torch.Tensor, weights: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slope)
        return (weights.abs() <= threshold).float().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


def layer_sparsity(weights: torch.Tensor, threshold: torch.Tensor,
                   density: HistogramDensity | GaussianKDE) -> torch.Tensor:
    """The exact fraction of ``weights`` pruned by ``threshold``, differentiable in ``threshold``.

    No gradient reaches ``weights`` through this term (as in the authors' code).
    """
    slope = (density.pdf(threshold.detach().reshape(1)) + density.pdf(-threshold.detach().reshape(1))).reshape(())
    return _Bridge.apply(threshold.reshape(()), weights.detach(), slope.to(threshold.dtype))
