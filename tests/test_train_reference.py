"""`ptsparse train-reference` on a tiny synthetic Fashion-MNIST in IDX format."""

from __future__ import annotations

import gzip
import json

import numpy as np
import torch

from ptsparse.cli import main
from ptsparse.models import load_checkpoint


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(directory, train: int = 256, test: int = 64) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 40, (count, 28, 28))
        for label in range(10):  # a learnable signal: a bright row per class
            images[labels == label, 2 * label + 4, :] = 255
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)


def test_train_reference_writes_weights_and_metadata(tmp_path, capsys):
    fake_fashion_mnist(tmp_path)
    out = tmp_path / "ref.safetensors"
    assert main(["train-reference", "--data-dir", str(tmp_path), "--epochs", "2", "--out", str(out), "-q"]) == 0
    metadata = json.loads((tmp_path / "ref.json").read_text())
    assert metadata["recipe"]["epochs"] == 2 and metadata["seed"] == 0
    assert 0.0 <= metadata["test_accuracy"] <= 1.0
    model, stored = load_checkpoint(out)
    assert stored["architecture"] == "reference_resnet20"
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_train_reference_is_deterministic(tmp_path, capsys):
    fake_fashion_mnist(tmp_path)
    states = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        main(["train-reference", "--data-dir", str(tmp_path), "--epochs", "1", "--out", str(out), "-q"])
        states.append(load_checkpoint(out)[0].state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
