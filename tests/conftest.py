"""Shared fixtures: tiny models and calibration data, and a guard against files written outside tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ptsparse.coupled import coupled_units
from ptsparse.offload import Offload
from ptsparse.targets import find_targets

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path(os.environ.get("PTSPARSE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST files missing (apt-get install dataset-fashion-mnist)",
)


class TinyCNN(nn.Module):
    """Conv stem, a grouped conv, a depthwise conv, BatchNorm, a residual add and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.grouped(x))
        x = x + torch.relu(self.bn2(self.pointwise(self.depthwise(x))))
        return self.fc(x.mean((2, 3)))


def largest_unit_step(model: nn.Module, example: torch.Tensor) -> int:
    """Weights in one channel of the model's largest coupled unit, over all its layers: the coarsest step of the
    channel pattern's counts (:mod:`ptsparse.coupled`); where coupling cannot be traced, the largest channel of one
    layer."""
    targets = find_targets(model)
    units = coupled_units(model, targets, example[:2], {}, required=False)
    if units is None:
        return max(t.weight[0].numel() for t in targets)
    shapes = {t.name: t.shape for t in targets}
    return max(sum(group.width * shapes[name][1:].numel() for name in group.members) for group in units.groups)


class RecordingOffload(Offload):
    """An :class:`~ptsparse.offload.Offload` that follows its moves: on a CPU-only machine the device is the CPU and a
    move changes nothing visible, so each block records, as it starts running, which blocks are then on the device.

    Attributes:
        on_device: the modules moved onto the device and not back (for a block: the block and all inside it).
        runs: per block call, ``(block name, names of the blocks on the device, stem/embedding on the device)``.
    """

    def __init__(self, model: nn.Module, blocks, device) -> None:
        super().__init__(model, blocks, device)
        self.on_device: set[nn.Module] = set()
        self.runs: list[tuple[str, list[str], bool]] = []
        first_outside = next(m for n, m in model.named_modules()
                             if n and not any(n == b or n.startswith(b + ".") or b.startswith(n + ".") for b in blocks))
        for name, block in zip(self.block_names, self.blocks):  # after the offload's own hooks, which are first
            block.register_forward_pre_hook(lambda module, args, name=name: self.runs.append(
                (name, [n for n, b in zip(self.block_names, self.blocks) if b in self.on_device],
                 first_outside in self.on_device)))

    def move(self, module: nn.Module, resident: bool, recurse: bool = True) -> None:
        super().move(module, resident, recurse)
        for inner in module.modules() if recurse else [module]:
            (self.on_device.add if resident else self.on_device.discard)(inner)


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


@pytest.fixture
def calib_images() -> torch.Tensor:
    return torch.randn(48, 1, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """An image folder: two classes of four random RGB images each (non-square, so resize and crop matter)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder") / "images"
    generator = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(44, 52, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="RGB").save(root / label / f"{i}.png")
    return root


@pytest.fixture(autouse=True, scope="session")
def no_stray_files():
    """Fails the run if a test leaves new files in the repository (tests must write under tmp_path)."""
    def listing() -> set[str]:
        skip = {".venv", ".git", ".pytest_cache", "__pycache__"}
        found = set()
        for root, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            found.update(os.path.join(root, f) for f in files if not f.endswith(".pyc"))
        return found

    before = listing()
    yield
    stray = listing() - before
    assert not stray, f"tests wrote files into the repository: {sorted(stray)[:5]}"
