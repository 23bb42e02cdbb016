"""Accuracy of a model, and agreement of a sparse model with its dense original."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed
from ._progress import progress


@torch.no_grad()
def predictions(model: nn.Module, data: Dataset, batch_size: int = 512, device: str = "cpu",
                show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max predictions and labels of ``model`` (in eval mode) over ``data``."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for x, y in progress(loader, show_progress, "evaluate"):
        preds.append(model(x.to(device)).argmax(1).cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512, device: str = "cpu",
             show_progress: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``data`` as a fraction in [0, 1].

    In a data-parallel run (:mod:`ptsparse.distributed`) every rank calls it: each predicts its contiguous part of
    ``data`` and the counts are summed.
    """
    rank, ranks = distributed.world()
    part = data if ranks == 1 else Subset(data, torch.tensor_split(torch.arange(len(data)), ranks)[rank].tolist())
    preds, labels = predictions(model, part, batch_size, device, show_progress)
    counts = distributed.all_reduce_(torch.tensor([float((preds == labels).sum()), float(len(labels))],
                                                  dtype=torch.float64))
    return float(counts[0] / counts[1])


def agreement(model: nn.Module, reference: nn.Module, data: Dataset, batch_size: int = 512,
              device: str = "cpu") -> float:
    """Fraction of samples on which ``model`` and ``reference`` predict the same class."""
    ours, _ = predictions(model, data, batch_size, device)
    theirs, _ = predictions(reference, data, batch_size, device)
    return float((ours == theirs).float().mean())
