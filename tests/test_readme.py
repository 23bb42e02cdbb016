"""Every ```python block of README.md, and the example in ptsparse's package docstring, runs as written.

Each runs in a fresh temporary working directory (``monkeypatch.chdir(tmp_path)``), so the ``runs/...`` it
writes land there. README blocks are run with ``exec`` on the README's own text, padded so that a traceback
names README lines; the docstring example is run by :mod:`doctest`, so the outputs it shows are checked too.
A new ```python block in the README fails ``test_every_readme_python_block_is_run_here`` until a test here
runs it (add a marker to ``BLOCKS``).

Budgets. The snippets are written for real sizes: 1024 calibration images, the 10,000-image test split,
ResNet-50 at 224 x 224. The fast tests run them unchanged under the ``tiny_budget`` fixture, which
monkeypatches what the snippets import when they run: ``ptsparse.data.sample_calibration`` draws at most
``TINY_CALIB`` (128) samples, ``ptsparse.sparsify`` distils for ``TINY_STEPS`` (20) steps where the method
distils and evaluates on the first ``TINY_EVAL`` (512) samples of its ``eval_data`` only, and
``ptsparse.data.FashionMNIST`` reads each split once per module. The ``slow`` tests run the quick start with no
override at all (1600 distillation steps), and the torchvision block (ResNet-50, Wanda) with random weights
written to ``resnet50.pth``, four random JPEGs in ``imagenet/train/`` and the calibration capped at those four.

The last tests pin the design that makes the quick start's ``ptsparse.load`` work: a model built by
``ptsparse.models`` carries its architecture (:func:`ptsparse.models.architecture_of`), which ``sparsify``
records when it is not given ``architecture=``.
"""

from __future__ import annotations

import copy
import doctest
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import ptsparse
import ptsparse.data
from ptsparse.cli import main
from ptsparse.models import (
    ARCHITECTURES,
    ReferenceResNet,
    architecture_of,
    load_reference,
    reference_resnet,
    resolve_model,
    tag_architecture,
)

from .conftest import REPO, needs_fashion_mnist

README = REPO / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Each README python block, by a string only it holds.
BLOCKS = {"quick start": "from ptsparse.models import load_reference",
          "torchvision": 'resolve_model("torchvision:resnet50"'}
TINY_CALIB = 128
TINY_EVAL = 512
TINY_STEPS = 20


def readme_blocks() -> list[str]:
    """The README's python blocks, each preceded by as many newlines as README lines come before it."""
    text = README.read_text()
    return ["\n" * text.count("\n", 0, match.start(1)) + match.group(1) for match in BLOCK.finditer(text)]


def run_block(name: str) -> dict:
    """Runs the README block ``name`` (see ``BLOCKS``) in a fresh namespace and returns the namespace."""
    source, = [block for block in readme_blocks() if BLOCKS[name] in block]
    namespace = {"__name__": "__readme__"}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 (the README's own code)
    return namespace


def run_docstring_example() -> None:
    """Runs the package docstring's example with doctest; fails with doctest's report."""
    test = doctest.DocTestParser().get_doctest(ptsparse.__doc__, {}, "ptsparse", ptsparse.__file__, 0)
    assert test.examples, "the package docstring has no example"
    report: list[str] = []
    result = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE).run(test, out=report.append)
    assert result.failed == 0, "".join(report)


@pytest.fixture(scope="module")
def fashion_mnist_once():
    """``ptsparse.data.FashionMNIST`` reading each split at most once in this module."""
    real, cache = ptsparse.data.FashionMNIST, {}

    def fashion_mnist(split: str = "train", *args, **kwargs):
        if args or kwargs:
            return real(split, *args, **kwargs)
        if split not in cache:
            cache[split] = real(split)
        return cache[split]

    return fashion_mnist


@pytest.fixture
def tiny_budget(monkeypatch, fashion_mnist_once):
    """At most ``TINY_CALIB`` calibration samples, ``TINY_STEPS`` distillation steps, ``TINY_EVAL`` evaluation
    samples (see the module doc)."""
    real_sample, real_sparsify = ptsparse.data.sample_calibration, ptsparse.sparsify

    def sample_calibration(source, size, seed, **kwargs):
        return real_sample(source, min(size, TINY_CALIB), seed, **kwargs)

    def sparsify(model, calib, config=None, *, eval_data=None, **kwargs):
        kwargs.setdefault("distill_iterations", TINY_STEPS)
        if eval_data is not None:
            eval_data = Subset(eval_data, range(min(TINY_EVAL, len(eval_data))))
        return real_sparsify(model, calib, config, eval_data=eval_data, **kwargs)

    monkeypatch.setattr(ptsparse.data, "sample_calibration", sample_calibration)
    monkeypatch.setattr(ptsparse.data, "FashionMNIST", fashion_mnist_once)
    monkeypatch.setattr(ptsparse, "sparsify", sparsify)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_quick_start(namespace: dict) -> None:
    """What the quick start's comments promise, and that its output directory works with `ptsparse export`."""
    result, sparse = namespace["result"], namespace["sparse"]
    assert result.architecture == "reference_resnet20"
    assert round(ptsparse.sparsity_of(result.model), 4) == 0.9
    assert {"name", "target", "achieved", "params", "shape"} <= result.report["layers"][0].keys()
    assert result.report["dense_accuracy"] is not None and result.report["sparse_accuracy"] is not None
    assert isinstance(sparse, ReferenceResNet) and same_weights(sparse, result.model)
    assert sorted(p.name for p in Path("runs/rn20-90").iterdir()) == ["config.yaml", "model.safetensors", "report.json"]
    assert main(["export", "runs/rn20-90", "--format", "compressed", "--out", "rn20-90.safetensors"]) == 0
    assert same_weights(ptsparse.load("rn20-90.safetensors"), result.model)


def test_every_readme_python_block_is_run_here():
    blocks = readme_blocks()
    assert blocks, "README.md has no python block"
    for block in blocks:
        matched = [name for name, marker in BLOCKS.items() if marker in block]
        assert len(matched) == 1, f"README python block run by no test here (or ambiguous):\n{block.strip()}"
    for name, marker in BLOCKS.items():
        assert sum(marker in block for block in blocks) == 1, f"no README python block for {name!r}"


@needs_fashion_mnist
def test_readme_quick_start_with_a_tiny_budget(tiny_budget, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_block("quick start")
    assert len(namespace["calib"]) == TINY_CALIB
    check_quick_start(namespace)


@needs_fashion_mnist
def test_package_docstring_example_with_a_tiny_budget(tiny_budget, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_docstring_example()
    assert isinstance(ptsparse.load(tmp_path / "runs" / "rn20-90"), ReferenceResNet)


@pytest.mark.slow
@needs_fashion_mnist
def test_readme_quick_start_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_block("quick start")
    assert len(namespace["calib"]) == 1024
    assert namespace["result"].report["dense_accuracy"] >= 0.93
    check_quick_start(namespace)


@pytest.mark.slow
@needs_fashion_mnist
def test_package_docstring_example_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_docstring_example()


@pytest.mark.slow
def test_readme_torchvision_block(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    torch.save(torchvision.models.resnet50().state_dict(), "resnet50.pth")
    generator = torch.Generator().manual_seed(0)
    for label in ("n01440764", "n01443537"):
        folder = tmp_path / "imagenet" / "train" / label
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(60, 80, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="RGB").save(folder / f"{i}.JPEG")
    real_sample = ptsparse.data.sample_calibration
    monkeypatch.setattr(ptsparse.data, "sample_calibration",
                        lambda source, size, seed, **kw: real_sample(source, min(size, len(source)), seed, **kw))
    namespace = run_block("torchvision")
    assert namespace["result"].architecture == "torchvision:resnet50"
    sparse = ptsparse.load("runs/rn50-wanda50")  # the block's comment
    assert isinstance(sparse, torchvision.models.ResNet) and same_weights(sparse, namespace["result"].model)
    assert ptsparse.sparsity_of(sparse) == pytest.approx(0.5, abs=1e-6)


# The design behind the quick start's last line: models built by ptsparse.models carry their architecture.

@pytest.mark.parametrize("build", [load_reference, reference_resnet, lambda: ARCHITECTURES.get("reference_resnet20")()],
                         ids=["load_reference", "reference_resnet", "ARCHITECTURES"])
def test_models_built_by_ptsparse_models_record_their_architecture(build):
    model = build()
    assert architecture_of(model) == "reference_resnet20"
    result = ptsparse.sparsify(model, torch.randn(8, 1, 28, 28), method="magnitude", sparsity=0.5, progress=False)
    assert result.architecture == "reference_resnet20"


def test_a_recorded_architecture_reloads_without_being_named(tmp_path):
    result = ptsparse.sparsify(reference_resnet(), torch.randn(8, 1, 28, 28), method="magnitude", sparsity=0.5,
                               progress=False)
    loaded = ptsparse.load(ptsparse.save(result, tmp_path / "run"))  # no model=, no architecture=
    assert isinstance(loaded, ReferenceResNet) and same_weights(loaded, result.model)
    assert architecture_of(loaded) == "reference_resnet20"  # so a loaded result can be sparsified again


def test_changed_or_foreign_models_record_no_architecture(tiny_cnn):
    new_head = load_reference()
    new_head.fc = nn.Linear(64, 3)
    new_activation = copy.deepcopy(load_reference())
    new_activation.stages[0][0].relu = nn.GELU()
    for model in (new_head, new_activation, reference_resnet(num_classes=3), tiny_cnn):
        assert architecture_of(model) is None
    assert ptsparse.sparsify(new_head, torch.randn(8, 1, 28, 28), method="magnitude", sparsity=0.5,
                             progress=False).architecture is None
    given = ptsparse.sparsify(tiny_cnn, torch.randn(8, 1, 12, 12), method="magnitude", sparsity=0.5, progress=False,
                              architecture="mine")
    assert given.architecture == "mine"  # an explicit architecture= always wins
    assert architecture_of(tag_architecture(tiny_cnn, "mine")) == "mine"


def test_zoo_spec_models_record_their_spec(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    spec = "torchvision:mobilenet_v3_small,num_classes=2"
    model, architecture = resolve_model(spec)
    assert architecture_of(model) == architecture == spec
    assert architecture_of(ARCHITECTURES.get(spec)()) == spec
    result = ptsparse.sparsify(model, torch.randn(4, 3, 32, 32), method="magnitude", sparsity=0.5, progress=False)
    assert result.architecture == spec
    loaded = ptsparse.load(result.save(tmp_path / "run"))
    assert isinstance(loaded, torchvision.models.MobileNetV3) and same_weights(loaded, result.model)
