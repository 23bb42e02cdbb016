"""torchvision, timm and Hugging Face models by name, their preprocessing, block discovery, and every
sparsification path on them (random weights, tiny inputs: nothing is downloaded)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ptsparse
from ptsparse.blocks import find_blocks
from ptsparse.cli import main
from ptsparse.data import ImageFolder, has_labels, load_source, sample_calibration
from ptsparse.errors import CheckpointError, ConfigError, ModelError, PtsparseError
from ptsparse.models import ARCHITECTURES, resolve_model, zoo
from ptsparse.targets import count_zeros, find_targets

warnings.filterwarnings("ignore", message=".*dense kernels.*")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def calibration(spec: str, model, images: Path, image_size: int | None = None, size: int = 8):
    return sample_calibration(load_source(images, transform=zoo.image_transform(spec, model, image_size)), size, 0)


def assert_exact(result, sparsity: float = 0.5) -> None:
    zeros, total = count_zeros(find_targets(result.model))
    assert zeros == round(sparsity * total)
    assert ptsparse.sparsity_of(result.model) == pytest.approx(sparsity, abs=0.5 / total)
    assert result.report["achieved_sparsity"] == ptsparse.sparsity_of(result.model)


def assert_whole_channels(result, sparsity: float = 0.5) -> None:
    """Channel pattern: every pruned row is a whole output channel, the global target is met within one
    channel per layer, and the output layer keeps every class."""
    targets = find_targets(result.model)
    slack = 0
    for target in targets:
        rows = target.weight.detach().flatten(1)
        zero_rows = (rows == 0).all(1)
        assert int((rows == 0).sum()) == int(zero_rows.sum()) * rows.shape[1], target.name
        slack += rows.shape[1]
    zeros, total = count_zeros(targets)
    assert abs(zeros - sparsity * total) <= slack
    assert bool((targets[-1].weight != 0).any(1).all())  # the classifier is never channel-pruned


# --- torchvision ----------------------------------------------------------------------------------------

# Every method preset, with its loops cut to a few steps (only that it runs and meets the target counts here).
SEARCH = {"unipts_search": {"population": 4, "generations": 1, "parents": 2, "elites": 1, "bn_samples": 8,
                             "fit_samples": 8}}
EVERY_METHOD = [
    ("magnitude", {}),
    ("wanda", {}),
    ("sparsegpt", {}),
    ("pot", {"layerwise_iterations": 2}),
    ("magnitude_kd", {"distill_iterations": 2}),
    ("fcpts", {"distill_iterations": 2}),
    ("unipts", {"distill_iterations": 2, **SEARCH}),
    ("iee", {"distill_iterations": 2}),
    ("recommended", {"distill_iterations": 2}),
    ("taylor", {"pattern": "channel"}),
]


def assert_every_method_meets_the_target(model, calib, architecture: str | None = None,
                                         channel_sparsity: float = 0.5) -> None:
    """Every method at 0.5 (``taylor``, whole channels: at ``channel_sparsity``) meets its target."""
    from ptsparse.methods import METHODS

    assert sorted(method for method, _ in EVERY_METHOD) == sorted(METHODS)
    for method, options in EVERY_METHOD:
        sparsity = channel_sparsity if method == "taylor" else 0.5
        result = ptsparse.sparsify(model, calib, method=method, sparsity=sparsity, batch_size=8, progress=False,
                                   architecture=architecture, **options)
        if method == "taylor":
            assert_whole_channels(result, sparsity)
        else:
            assert_exact(result)
        assert result.model(calib.inputs[:2]).shape == model(calib.inputs[:2]).shape


# 64x64, not 32x32: at 32x32 the last feature maps are 1x1, so 8 of the 9 taps of every 3x3 kernel there only
# ever see zero padding, and SparseGPT zeroes such never-active inputs on top of its mask (more zeros than asked).
# Slow (ResNet-18 alone takes a minute and a half on one core: SparseGPT's 4608-wide Hessians of layer4, the
# UniPTS search and FCPTS on 11M weights); the default suite runs the check below on a quarter-width MobileNetV2.
@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("resnet18", 64), ("mobilenet_v2", 64)])
def test_torchvision_models_meet_the_target_for_every_method(images, name, size):
    pytest.importorskip("torchvision")
    spec = f"torchvision:{name},num_classes=2"
    torch.manual_seed(0)
    model, architecture = resolve_model(spec)
    assert architecture == spec and not model.training
    calib = calibration(architecture, model, images, image_size=size)
    assert calib.inputs.shape == (8, 3, size, size) and sorted(calib.labels.tolist()) == [0] * 4 + [1] * 4
    assert_every_method_meets_the_target(model, calib, architecture)


def test_a_small_torchvision_model_meets_the_target_for_every_method(images):
    """The fast variant of the slow test above: MobileNetV2 at a quarter of its width (inverted residuals,
    depthwise convolutions, torchvision's blocks; 0.24M weights instead of 2.2M), still at 64x64."""
    pytest.importorskip("torchvision")
    spec = "torchvision:mobilenet_v2,num_classes=2,width_mult=0.25"
    torch.manual_seed(0)
    model, architecture = resolve_model(spec)
    assert architecture == spec and not model.training
    assert model.features[1].conv[0][0].groups == 8  # the quarter-width model, not the default
    calib = calibration(architecture, model, images, image_size=64)
    assert calib.inputs.shape == (8, 3, 64, 64)
    assert_every_method_meets_the_target(model, calib, architecture)


def test_torchvision_result_reloads_by_architecture(images, tmp_path):
    pytest.importorskip("torchvision")
    model, architecture = resolve_model("torchvision:mobilenet_v2,num_classes=2")
    calib = calibration(architecture, model, images, image_size=32)
    result = ptsparse.sparsify(model, calib, method="wanda", sparsity=0.5, progress=False, architecture=architecture)
    ptsparse.save(result, tmp_path / "run")
    loaded = ptsparse.load(tmp_path / "run")
    again, recorded = resolve_model(tmp_path / "run")
    assert recorded == architecture and architecture in ARCHITECTURES
    x = calib.inputs[:3]
    assert torch.equal(loaded(x), result.model(x)) and torch.equal(again(x), result.model(x))


def test_a_model_that_reads_its_version_while_loading_reloads(tmp_path):
    """torchvision's MNASNet refuses a state dict without its version (safetensors stores tensors only)."""
    pytest.importorskip("torchvision")
    model, architecture = resolve_model("torchvision:mnasnet0_5,num_classes=2")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = ptsparse.sparsify(model, images, method="magnitude", sparsity=0.5, progress=False,
                               architecture=architecture)
    ptsparse.save(result, tmp_path / "run")
    assert torch.equal(ptsparse.load(tmp_path / "run")(images), result.model(images))


def test_torchvision_preprocessing_matches_torchvision(tmp_path):
    """The built-in transform gives what the model's own `weights.transforms()` gives (no download)."""
    torchvision = pytest.importorskip("torchvision")
    from PIL import Image

    pixels = (torch.rand(300, 410, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, mode="RGB")
    for name in ("resnet18", "mobilenet_v2"):
        ours = zoo.image_transform(f"torchvision:{name}")
        theirs = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        assert (ours.crop, ours.resize) == (224, theirs.resize_size[0])
        assert torch.allclose(ours(image), theirs(image), atol=1e-5)
    small = zoo.image_transform("torchvision:resnet18", image_size=64)
    assert (small.crop, small.resize) == (64, 73) and small(image).shape == (3, 64, 64)
    v1 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()  # DEFAULT is V2 (resize 232)
    assert torch.allclose(zoo.image_transform("torchvision:mobilenet_v2", resize=256)(image), v1(image), atol=1e-5)
    with pytest.raises(ModelError, match="smaller than the crop"):
        zoo.image_transform("torchvision:resnet18", image_size=64, resize=32)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_file_loads_into_the_named_model(tmp_path):
    pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source, _ = resolve_model("torchvision:resnet18,num_classes=3")
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    for file in ("w.safetensors", "w.pth"):
        model, architecture = resolve_model("torchvision:resnet18,num_classes=3", weights=tmp_path / file)
        assert architecture == "torchvision:resnet18,num_classes=3"
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="does not match"):
        resolve_model("torchvision:resnet18", weights=tmp_path / "w.safetensors")  # 1000 classes, not 3
    (tmp_path / "evil.pth").write_bytes(b"\x80\x04cos\nsystem\nq\x00.")
    with pytest.raises(CheckpointError, match="weights_only"):
        resolve_model("torchvision:resnet18", weights=tmp_path / "evil.pth")


def test_bad_specs_are_one_line_errors():
    pytest.importorskip("torchvision")
    with pytest.raises(ModelError, match="'resnet_nope'"):
        resolve_model("torchvision:resnet_nope")
    with pytest.raises(ModelError, match="key=value"):
        resolve_model("torchvision:resnet18,42")
    with pytest.raises(ModelError, match="config.json"):
        resolve_model("hf:/no/such/directory")


# --- timm -----------------------------------------------------------------------------------------------

TIMM_VIT = "timm:vit_tiny_patch16_224,depth=2,img_size=32,num_classes=2,patch_size=8"


@pytest.fixture(scope="module")
def timm_vit(images):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model, architecture = resolve_model(TIMM_VIT)
    return model, architecture, calibration(architecture, model, images)


def test_timm_vit_preprocessing_follows_its_data_config(timm_vit):
    model, architecture, calib = timm_vit
    transform = zoo.image_transform(architecture, model)
    text = str(transform)
    assert "bicubic" in text and "CenterCrop(size=(32, 32))" in text  # timm's ViT config at the built size
    assert "Resize(size=35," in text  # crop_pct 0.9
    assert "Resize(size=40," in str(zoo.image_transform(architecture, model, resize=40))
    assert calib.inputs.shape == (8, 3, 32, 32)


def test_timm_vit_meets_the_target_for_every_method(timm_vit):
    model, architecture, calib = timm_vit
    # channels: the residual stream (LayerNorms) stays dense and every attention keeps a head: 0.5 is refused
    with pytest.raises(ConfigError, match="sparsity 0.5 is infeasible: the layer caps allow at most"):
        ptsparse.sparsify(model, calib, method="taylor", sparsity=0.5, batch_size=8, progress=False)
    assert_every_method_meets_the_target(model, calib, architecture, channel_sparsity=0.3)


def test_timm_vit_2_4_on_linear_layers(timm_vit):
    model, architecture, calib = timm_vit
    result = ptsparse.sparsify(model, calib, method="wanda", pattern="2:4", layer_types=["Linear"], progress=False)
    targets = find_targets(result.model, layer_types=["Linear"])
    assert {t.name for t in targets} >= {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc2", "head"}
    for target in targets:
        groups = target.weight.detach().reshape(target.shape[0], -1, 4)
        assert bool(((groups == 0).sum(-1) == 2).all()), target.name
    assert ptsparse.sparsity_of(result.model, {"layer_types": ["Linear"]}) == 0.5
    assert bool((result.model.patch_embed.proj.weight != 0).all())  # the conv stem is not a target here


def test_timm_vit_block_distillation(timm_vit):
    model, architecture, calib = timm_vit
    result = ptsparse.sparsify(model, calib, method="magnitude_kd", objective="kd_blocks", distill_iterations=2,
                               sparsity=0.5, progress=False)
    assert_exact(result)
    assert result.report["recovery"]["history"]


# --- Hugging Face ---------------------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the a cat dog sat on mat ran fast slow big small red".split()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT for sequence classification: config and tokenizer only (random weights)."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("bert")
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            vocab_size=len(WORDS), max_position_embeddings=32, num_labels=3).save_pretrained(str(directory))
    lines = ["the cat sat on the mat", "a dog ran fast", "big red dog", "", "small slow cat on a mat"]
    (directory / "text.txt").write_text("\n".join(lines * 4) + "\n")
    return directory


@pytest.fixture(scope="module")
def bert(bert_dir):
    torch.manual_seed(0)
    model, architecture = resolve_model(f"hf:{bert_dir}")
    source = load_source(f"text:{bert_dir / 'text.txt'}", tokenizer=zoo.load_tokenizer(architecture), seq_len=12)
    return model, architecture, sample_calibration(source, 16, 0)


def test_bert_from_a_directory_takes_token_ids(bert, bert_dir):
    model, architecture, calib = bert
    assert architecture == f"hf:{bert_dir.resolve()}" and isinstance(model, zoo.HFLogits)
    assert calib.inputs.shape == (16, 12) and calib.inputs.dtype == torch.int64 and calib.labels is None
    assert int(calib.inputs[0, 0]) == WORDS.index("[CLS]") and int(calib.inputs[0, -1]) == 0  # padded with [PAD]
    logits = model(calib.inputs[:2])
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)
    # pad positions are masked out: extra padding leaves the logits unchanged
    ids = calib.inputs[:1]
    assert torch.allclose(model(torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], 1)), model(ids), atol=1e-5)


def test_bert_meets_the_target_for_every_method(bert):
    model, architecture, calib = bert
    assert_every_method_meets_the_target(model, calib, architecture, channel_sparsity=0.3)


def test_bert_result_reloads(bert, tmp_path):
    model, architecture, calib = bert
    result = ptsparse.sparsify(model, calib, method="wanda", sparsity=0.5, progress=False, architecture=architecture)
    ptsparse.save(result, tmp_path / "run")
    loaded = ptsparse.load(tmp_path / "run")
    assert isinstance(loaded, zoo.HFLogits)
    assert torch.equal(loaded(calib.inputs[:4]), result.model(calib.inputs[:4]))


def test_hf_weights_load_with_or_without_the_prefix(bert, bert_dir, tmp_path):
    from safetensors.torch import save_file

    model, _, _ = bert
    torch.manual_seed(5)
    other, _ = resolve_model(f"hf:{bert_dir}")
    save_file({k: v.contiguous() for k, v in other.hf.state_dict().items()}, tmp_path / "plain.safetensors")
    loaded, _ = resolve_model(f"hf:{bert_dir}", weights=tmp_path / "plain.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in other.state_dict().items())
    other.hf.save_pretrained(str(tmp_path / "saved"))  # a directory with its weights loads them
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (bert_dir / name).exists():
            (tmp_path / "saved" / name).write_bytes((bert_dir / name).read_bytes())
    again, _ = resolve_model(f"hf:{tmp_path / 'saved'}")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in other.state_dict().items())


@pytest.fixture(scope="module")
def hf_vit_dir(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("vit")
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8, num_labels=2).save_pretrained(str(directory))
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_hf_vit_on_an_image_folder(hf_vit_dir, images, method):
    torch.manual_seed(0)
    model, architecture = resolve_model(f"hf:{hf_vit_dir}")
    transform = zoo.image_transform(architecture, model)
    assert isinstance(transform, zoo.HFImageTransform)  # the directory's preprocessor_config.json
    calib = calibration(architecture, model, images)
    assert calib.inputs.shape == (8, 3, 32, 32) and float(calib.inputs.min()) >= -1 and float(calib.inputs.max()) <= 1
    result = ptsparse.sparsify(model, calib, method=method, sparsity=0.5, progress=False)
    assert_exact(result)
    assert result.model(calib.inputs[:2]).shape == (2, 2)


# --- block discovery ------------------------------------------------------------------------------------

def blocks_of(model) -> list[str]:
    return find_blocks(model, find_targets(model))


def test_blocks_of_torchvision_models():
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18()
    assert blocks_of(resnet) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert blocks_of(torchvision.models.mobilenet_v2()) == [f"features.{i}" for i in range(1, 18)]
    assert find_blocks(resnet, find_targets(resnet), ["layer4.*"]) == ["layer4.0", "layer4.1"]


def test_blocks_of_transformers(timm_vit, bert):
    assert blocks_of(timm_vit[0]) == ["blocks.0", "blocks.1"]
    assert blocks_of(bert[0]) == ["hf.bert.encoder.layer.0", "hf.bert.encoder.layer.1"]
    assert find_blocks(bert[0], find_targets(bert[0]), ["hf.bert.encoder.layer.1"]) == ["hf.bert.encoder.layer.1"]


def test_blocks_refined_to_the_repeated_units_of_a_stage():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False)
    blocks = blocks_of(model)
    assert blocks[:3] == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0"] and len(blocks) == 12


def test_bert_block_distillation(bert):
    model, architecture, calib = bert
    result = ptsparse.sparsify(model, calib, method="magnitude_kd", objective="kd_blocks", distill_iterations=2,
                               batch_size=8, sparsity=0.5, progress=False)
    assert_exact(result)


# --- missing extras and the command line ----------------------------------------------------------------

@pytest.mark.parametrize("spec, modules, extra", [
    ("torchvision:resnet18", ("torchvision", "torchvision.models"), "vision"),
    ("timm:resnet18", ("timm",), "timm"),
    ("hf:.", ("transformers",), "hf"),
])
def test_missing_extra_names_the_install_command(monkeypatch, tmp_path, spec, modules, extra):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    if spec == "hf:.":
        (tmp_path / "config.json").write_text("{}")
        spec = f"hf:{tmp_path}"
    with pytest.raises(PtsparseError, match=rf"pip install 'ptsparse\[{extra}\]'") as info:
        resolve_model(spec)
    assert isinstance(info.value, ImportError) and "\n" not in str(info.value)


def test_cli_missing_extra_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)
    code, _, err = run_cli(capsys, "sparsify", "--method", "magnitude", "--model", "timm:resnet18", "--out",
                           tmp_path / "out", "-q")
    assert code == 2 and err.strip().count("\n") == 0
    assert err.startswith("ptsparse: error:") and "pip install 'ptsparse[timm]'" in err
    assert not (tmp_path / "out").exists()


def test_cli_image_folder_in_sparse_model_out(capsys, images, tmp_path):
    pytest.importorskip("torchvision")
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "sparsify", "--model", "torchvision:mobilenet_v2,num_classes=2", "--data", images,
                              "--image-size", "32", "--calib-size", "8", "--sparsity", "0.5", "--method", "magnitude",
                              "--out", out, "-q")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6) and report["calib_size"] == 8
    assert report["sparse_accuracy"] is not None  # class folders: evaluated on them
    code, stdout, _ = run_cli(capsys, "eval", "--model", out, "--data", images, "--image-size", "32", "-q")
    assert code == 0 and json.loads(stdout)["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_cli_text_file_with_a_local_bert(capsys, bert_dir, tmp_path):
    out = tmp_path / "bert"
    code, _, _ = run_cli(capsys, "sparsify", "--model", f"hf:{bert_dir}", "--data", f"text:{bert_dir / 'text.txt'}",
                         "--seq-len", "12", "--calib-size", "16", "--sparsity", "0.5", "--method", "wanda",
                         "--out", out, "-q")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6) and report["sparse_accuracy"] is None
    assert isinstance(ptsparse.load(out), zoo.HFLogits)


def test_flat_folder_is_unlabelled(images, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(images.glob("*/*.png"))[:3]:
        (flat / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    data = ImageFolder(flat, crop=16, channels=3)
    assert len(data) == 3 and data.classes == [] and not has_labels(data)
    assert sample_calibration(data, 3, 0).labels is None


def test_exports_know_the_input_shape_of_image_model_specs():
    pytest.importorskip("torchvision")
    from ptsparse.export import input_shape_for

    assert input_shape_for("torchvision:resnet18") == (3, 224, 224)
    assert input_shape_for("torchvision:resnet18", (3, 64, 64)) == (3, 64, 64)


@pytest.mark.parametrize("allocation", ["uniform", "knapsack"])
def test_channel_pruned_mobilenet_v2_exports_a_smaller_working_model(images, allocation):
    pytest.importorskip("torchvision")
    pytest.importorskip("torch_pruning")
    from ptsparse.export.channels import remove_channels
    from ptsparse.graph.cost import count_params

    model, architecture = resolve_model("torchvision:mobilenet_v2,num_classes=2")
    calib = calibration(architecture, model, images, image_size=64)
    result = ptsparse.sparsify(model, calib, method="taylor", sparsity=0.3, allocation=allocation, batch_size=8,
                               progress=False, architecture=architecture)
    x = calib.inputs[:4]
    smaller, report = remove_channels(result.model, x)
    assert count_params(smaller) < count_params(result.model) and report["channels_removed"] > 0
    if allocation == "knapsack":
        assert report["mac_reduction"] >= 0.3
    assert torch.allclose(smaller(x), result.model(x), atol=1e-4)
