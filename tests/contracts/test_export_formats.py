"""Contracts every registered export format meets: it writes one file (or directory), atomically, that reads back
as the model.

A format with a checkpoint reader reads back through ``ptsparse.load`` into a fresh model of the architecture;
ONNX is run with onnxruntime; a Hugging Face directory (``hf``, for Hugging Face models only: a tiny BERT here)
loads as ``--model hf:DIRECTORY``. Either way the outputs are the sparse model's.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.checkpoint import READERS
from ptsparse.errors import UnknownOptionError
from ptsparse.export import FORMATS, export_model

# What each format needs beyond the core package.
EXTRAS = {"channels": ("torch_pruning",), "onnx": ("onnx", "onnxscript", "onnxruntime"), "hf": ("transformers",)}
INPUT_SHAPE = (1, 12, 12)


def plain_cnn() -> nn.Module:
    """Convolutions, BatchNorm and a classifier, whose channels every format can remove or store."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def missing_extras(name: str) -> list[str]:
    return [module for module in EXTRAS.get(name, ()) if importlib.util.find_spec(module) is None]


@pytest.fixture(scope="module")
def channel_pruned() -> torch.nn.Module:
    """A small CNN with whole channels pruned: every format applies to it (channel removal needs dead channels)."""
    torch.manual_seed(0)
    calibration = torch.randn(32, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    return ptsparse.sparsify(plain_cnn(), calibration, method="taylor", sparsity=0.5, progress=False).model


def hf_pruned(root) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny BERT classifier (config only, random weights) with whole channels pruned, and token ids for it."""
    import transformers

    from ptsparse.models import resolve_model

    transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            vocab_size=20, max_position_embeddings=16, num_labels=3).save_pretrained(str(root))
    torch.manual_seed(0)
    model, architecture = resolve_model(f"hf:{root}")
    ids = torch.randint(20, (16, 8), generator=torch.Generator().manual_seed(1))
    return ptsparse.sparsify(model, ids, method="taylor", sparsity=0.4, progress=False).model, ids[:4]  # 2 heads: one stays


@pytest.mark.parametrize("name", FORMATS.names())
def test_every_format_round_trips(name, channel_pruned, tmp_path, tmp_path_factory):
    if missing := missing_extras(name):
        pytest.skip(f"{name} needs {', '.join(missing)}")
    exporter = FORMATS.get(name)
    path = tmp_path / f"model{exporter.suffix}"
    if name == "hf":
        sparse, example = hf_pruned(tmp_path_factory.mktemp("bert"))
    else:
        sparse, example = channel_pruned, torch.randn(4, *INPUT_SHAPE, generator=torch.Generator().manual_seed(2))
    report = export_model(sparse, name, path, input_shape=INPUT_SHAPE)
    files = list(path.rglob("*")) if exporter.directory else [path]
    assert report["bytes"] == sum(file.stat().st_size for file in files) > 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it
    with torch.no_grad():
        expected = sparse(example)
    if exporter.reader is not None:
        assert READERS.get(name) is exporter.reader
        loaded = ptsparse.load(path, model=plain_cnn())
        with torch.no_grad():
            outputs = loaded(example)
    elif name == "hf":
        from ptsparse.models import resolve_model

        outputs = resolve_model(f"hf:{path}")[0](example)
    else:
        from ptsparse.export.onnx import onnxruntime_outputs

        outputs = onnxruntime_outputs(path, example)
    assert torch.allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    assert isinstance(exporter.summary(report, path), str)
    assert all(isinstance(w, str) for w in exporter.warnings(sparse, {}))


def test_an_unknown_format_names_the_formats(channel_pruned, tmp_path):
    with pytest.raises(UnknownOptionError) as info:
        export_model(channel_pruned, "zip", tmp_path / "model.zip")
    assert str(info.value) == f"unknown export format 'zip'; choose one of: {', '.join(FORMATS.names())}"
    assert not list(tmp_path.iterdir())
