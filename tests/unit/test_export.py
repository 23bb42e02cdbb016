"""Exports: compressed checkpoints, channel removal, ONNX, 2:4 kernels, and the cost measurements."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import ptsparse
from ptsparse.errors import CheckpointError, ConfigError, ExportError, UnknownOptionError
from ptsparse.export import MissingExtraError, export_model, require
from ptsparse.export.compressed import decode_state, encode_state, pack_bits, unpack_bits
from ptsparse.export.semi_structured import is_two_four, to_semi_structured
from ptsparse.graph.cost import count_macs, count_params, measure_latency, speedup_warnings
from ptsparse.models import load_reference
from ptsparse.targets import find_targets

ARCH = {"architecture": "reference_resnet20"}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so equality is bitwise (tells -0.0 from +0.0, compares NaNs)."""
    return tensor.detach().contiguous().flatten().view(torch.uint8) if tensor.numel() else tensor


def reference_inputs(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference_90():
    """The reference model at 90% unstructured (magnitude, ERK)."""
    return ptsparse.sparsify(load_reference(), reference_inputs(64), method="magnitude", sparsity=0.9, progress=False,
                             architecture="reference_resnet20")


@pytest.fixture(scope="module")
def reference_channels():
    """The reference model with 30% of its weights pruned as whole, coupled channels (taylor preset)."""
    return ptsparse.sparsify(load_reference(), reference_inputs(64), method="taylor", sparsity=0.3,
                             progress=False, architecture="reference_resnet20")


# compressed checkpoints ---------------------------------------------------------------------------

def test_bitmask_packing_round_trips():
    mask = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.numel()).view(mask.shape), mask)


def test_encoding_is_exact_for_every_dtype_and_edge_case():
    state = {
        "sparse": torch.tensor([[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]] * 8),
        "dense": torch.randn(6, 4),
        "halves": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float16),
        "count": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "ints": torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3], dtype=torch.int32),
    }
    tensors, counts = encode_state(state)
    assert counts == {"tensors": 6, "bitmask_tensors": 3}  # sparse, halves, ints; dense/count/empty stay dense
    decoded = decode_state(tensors)
    assert list(decoded) == list(state)
    for name, tensor in state.items():
        assert decoded[name].dtype == tensor.dtype and decoded[name].shape == tensor.shape, name
        assert torch.equal(bits(decoded[name]), bits(tensor)), name


def test_negative_zeros_read_back_as_positive_zeros():
    weight = torch.tensor([-0.0, 0.0, 3.0, -0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    decoded = decode_state(encode_state({"w": weight})[0])["w"]
    assert torch.equal(decoded, weight) and not torch.signbit(decoded[decoded == 0]).any()


def test_baked_models_hold_positive_zeros_only(reference_90):
    for module in reference_90.model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            zeros = module.weight == 0
            assert not torch.signbit(module.weight[zeros]).any()


def test_compressed_round_trip_is_bit_exact(reference_90, tmp_path):
    path = tmp_path / "model.safetensors"
    report = export_model(reference_90.model, "compressed", path, metadata=ARCH)
    loaded = ptsparse.load(path)  # the architecture named in the file is rebuilt
    original = reference_90.model.state_dict()
    assert sorted(loaded.state_dict()) == sorted(original)
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == original[name].dtype and torch.equal(bits(tensor), bits(original[name])), name
    x = reference_inputs(8, seed=1)
    assert torch.equal(bits(loaded(x)), bits(reference_90.model(x)))
    assert report["bytes"] == path.stat().st_size
    # 90% with 4-byte values: bitmask limit 7.6x, the dense BatchNorm parameters take a little of it
    assert report["size_ratio"] >= 7.0


def test_half_precision_values_are_smaller_and_cast_back(reference_90, tmp_path):
    path = tmp_path / "half.safetensors"
    report = export_model(reference_90.model, "compressed", path, metadata=ARCH, value_dtype="float16")
    assert report["value_dtype"] == "float16" and report["size_ratio"] >= 11.0
    loaded = ptsparse.load(path, model=load_reference())
    for name, tensor in loaded.state_dict().items():
        original = reference_90.model.state_dict()[name]
        expected = original.half().to(original.dtype) if original.is_floating_point() else original
        assert tensor.dtype == original.dtype and torch.equal(tensor, expected), name


def test_corrupt_compressed_checkpoint_is_a_clear_error(reference_90, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model.safetensors"
    export_model(reference_90.model, "compressed", path, metadata=ARCH)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["bitmask"] = tensors["bitmask"][:10]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="corrupt.*bitmask"):
        ptsparse.load(path)


def test_bad_export_requests_are_clear_errors(reference_90, tmp_path):
    with pytest.raises(UnknownOptionError, match="'zip'.*compressed, channels, onnx"):
        export_model(reference_90.model, "zip", tmp_path / "x")
    with pytest.raises(ConfigError, match="'int3'.*float16"):
        export_model(reference_90.model, "compressed", tmp_path / "x", value_dtype="int3")
    with pytest.raises(ConfigError, match="input shape"):
        export_model(reference_90.model, "channels", tmp_path / "x", metadata={"architecture": "mystery"})
    assert not list(tmp_path.iterdir())


# channel removal ----------------------------------------------------------------------------------

def kept(model: nn.Module, name: str) -> int:
    weight = model.get_submodule(name).weight
    return int(weight.flatten(1).ne(0).any(1).sum())


def expected_reference_params(model: nn.Module) -> int:
    """Parameters of the reference ResNet-20 shrunk to the live channels of ``model``, counted by hand."""
    streams = [kept(model, "stem.0"), kept(model, "stages.1.0.shortcut.0"), kept(model, "stages.2.0.shortcut.0")]
    total = streams[0] * 9 + 2 * streams[0]
    width = streams[0]
    for stage in range(3):
        for block in range(3):
            prefix = f"stages.{stage}.{block}"
            inner, out = kept(model, f"{prefix}.conv1"), streams[stage]
            total += inner * width * 9 + 2 * inner + out * inner * 9 + 2 * out
            if block == 0 and stage > 0:
                total += out * width + 2 * out
            width = out
    return total + 10 * width + 10


def test_taylor_channels_are_coupled_and_silenced(reference_channels):
    model = reference_channels.model
    for stage, first in enumerate(["stem.0", "stages.1.0.shortcut.0", "stages.2.0.shortcut.0"]):
        rows = model.get_submodule(first).weight.flatten(1).ne(0).any(1)
        assert not rows.all()
        for block in range(3):  # every layer adding into the residual stream prunes the same channels
            conv2 = model.get_submodule(f"stages.{stage}.{block}.conv2").weight.flatten(1).ne(0).any(1)
            assert torch.equal(conv2, rows)
    bn = model.get_submodule("stages.0.0.bn1")
    pruned = ~model.get_submodule("stages.0.0.conv1").weight.flatten(1).ne(0).any(1)
    assert pruned.any() and not bn.weight[pruned].any() and not bn.bias[pruned].any()


def test_channel_removal_gives_a_smaller_model_with_the_same_outputs(reference_channels, tmp_path):
    from ptsparse.export.channels import remove_channels

    masked = reference_channels.model
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    smaller, report = remove_channels(masked, reference_inputs(8))
    assert count_params(smaller) == report["params_after"] == expected_reference_params(masked)
    assert report["params_after"] < 0.6 * report["params"] and report["zeroed_channels_kept"] == 0
    x = reference_inputs(32, seed=3)
    assert torch.allclose(smaller(x), masked(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in masked.state_dict().items())  # masked model untouched
    assert 0 < report["mac_reduction"] < 1

    path = tmp_path / "smaller.safetensors"
    written = export_model(masked, "channels", path, metadata=ARCH)
    assert written["size_ratio"] > 1.5
    loaded = ptsparse.load(path)
    assert count_params(loaded) == report["params_after"]
    assert torch.allclose(loaded(x), masked(x), rtol=1e-4, atol=1e-5)


def pruned_in_eights(method: str):
    result = ptsparse.sparsify(load_reference(), reference_inputs(64), method=method, pattern="channel",
                               allocation="uniform", sparsity=0.3, channel_multiple=8, progress=False)
    for target in find_targets(result.model)[:-1]:  # the classifier keeps its 10 classes
        assert int((target.weight.detach().flatten(1) != 0).any(1).sum()) % 8 == 0, target.name
    return result


def test_channel_multiple_keeps_magnitude_widths_multiples():
    pruned_in_eights("magnitude")


def test_channel_multiple_exports_widths_that_are_multiples():
    from ptsparse.export.channels import remove_channels

    smaller, report = remove_channels(pruned_in_eights("taylor").model, reference_inputs(8))
    assert report["channels_removed"] > 0
    assert all(m.out_channels % 8 == 0 for m in smaller.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("options, message", [
    ({"pattern": "unstructured"}, "channel_multiple 8 applies to pattern 'channel', not 'unstructured'"),
    ({"pattern": "channel", "method": "iee"}, "channel_multiple 8 needs channels chosen N at a time; dynamics 'iee' "
                                              "choose single channels"),
])
def test_channel_multiple_combinations_are_checked(options, message):
    from ptsparse.errors import IncompatibleOptionsError

    with pytest.raises(IncompatibleOptionsError, match=message):
        ptsparse.SparsityConfig(channel_multiple=8, **options)
    with pytest.raises(ConfigError, match="channel_multiple must be a positive integer, got 0"):
        ptsparse.SparsityConfig(method="magnitude", channel_multiple=0)


def test_uncoupled_channel_masks_keep_the_channels_still_in_use(monkeypatch):
    from ptsparse.coupled import CoupledUnits
    from ptsparse.errors import ExportError
    from ptsparse.export.channels import remove_channels

    def untraceable(*args, **kwargs):
        raise ExportError("torch-pruning cannot trace the model")

    # without the coupling, magnitude prunes each layer's channels on its own: residual-stream channels are zero
    # in one layer only
    monkeypatch.setattr(CoupledUnits, "trace", untraceable)
    result = ptsparse.sparsify(load_reference(), reference_inputs(64), method="magnitude", pattern="channel",
                               allocation="uniform", sparsity=0.3, progress=False)
    smaller, report = remove_channels(result.model, reference_inputs(8))
    assert report["zeroed_channels_kept"] > 0
    x = reference_inputs(16, seed=4)
    assert torch.allclose(smaller(x), result.model(x), rtol=1e-4, atol=1e-5)


class BiasedResidual(nn.Module):
    """Convolutions with biases and no BatchNorm, one residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv_b(torch.relu(self.conv_a(x))))
        return self.fc(x.mean((2, 3)))


def test_taylor_zeroes_the_biases_of_pruned_channels_so_they_can_all_go():
    from ptsparse.export.channels import remove_channels

    torch.manual_seed(0)
    inputs = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    result = ptsparse.sparsify(BiasedResidual().eval(), inputs, method="taylor", sparsity=0.5, progress=False)
    model = result.model
    stem_rows = model.stem.weight.flatten(1).ne(0).any(1)
    assert torch.equal(model.conv_b.weight.flatten(1).ne(0).any(1), stem_rows)  # coupled by the add
    assert not model.stem.bias[~stem_rows].any() and not model.conv_b.bias[~stem_rows].any()
    smaller, report = remove_channels(model, inputs[:4])
    assert report["zeroed_channels_kept"] == 0
    assert smaller.stem.out_channels == smaller.conv_b.out_channels == int(stem_rows.sum()) < 8
    assert torch.allclose(smaller(inputs), model(inputs), rtol=1e-4, atol=1e-5)


class BrokenTrace(nn.Module):
    """A conv whose input arrives through NumPy: torch-pruning cannot see that ``conv`` reads ``stem``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        hidden = torch.relu(self.conv(torch.from_numpy(y.detach().numpy().copy())))
        return self.fc(torch.cat([y.mean((2, 3)), hidden.mean((2, 3))], 1))


def test_a_model_that_cannot_be_traced_names_the_module():
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = BrokenTrace().eval()
    with torch.no_grad():
        model.stem.weight[:3] = 0
        model.stem.bias[:3] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from ptsparse.export.channels import remove_channels

    with pytest.raises(ExportError, match="'conv'"):
        remove_channels(model, torch.randn(2, 1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_missing_extra_names_the_install_command(monkeypatch):
    import importlib

    real = importlib.import_module

    def without(name, *args):
        if name == "torch_pruning":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without)
    with pytest.raises(MissingExtraError, match=r"torch-pruning.*pip install 'ptsparse\[export\]'"):
        require("torch_pruning", "channel removal")


def test_the_core_package_imports_without_the_extras():
    code = ("import sys\n"
            "for name in ('torch_pruning', 'onnx', 'onnxscript', 'onnxruntime'): sys.modules[name] = None\n"
            "import ptsparse, ptsparse.export, ptsparse.export.channels, ptsparse.export.onnx, ptsparse.cli\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ONNX ---------------------------------------------------------------------------------------------

def test_onnx_export_matches_pytorch(reference_90, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from ptsparse.export.onnx import onnxruntime_outputs

    path = tmp_path / "model.onnx"
    report = export_model(reference_90.model, "onnx", path, metadata=ARCH)
    assert path.is_file() and report["max_relative_difference"] < 1e-4
    x = reference_inputs(5, seed=2)  # a batch size the export never saw
    assert torch.allclose(onnxruntime_outputs(path, x), reference_90.model(x), rtol=1e-3, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left


# 2:4 kernels and measurements ---------------------------------------------------------------------

def test_two_four_check():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_two_four(weight)
    assert not is_two_four(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
    assert not is_two_four(torch.ones(2, 6))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_two_four_kernels_on_cpu_say_why_there_is_no_speedup():
    model = nn.Sequential(nn.Linear(64, 64))
    swapped, report = to_semi_structured(model, "cpu")
    assert not report["available"] and "CUDA" in report["reason"] and "no speedup" in report["reason"]
    assert isinstance(swapped[0].weight, nn.Parameter) and torch.equal(swapped[0].weight, model[0].weight)
    with pytest.raises(ConfigError, match="'float64'"):
        to_semi_structured(model, "cpu", dtype="float64")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="2:4 kernels need a CUDA GPU of compute capability >= 8.0")
def test_two_four_kernels_on_cuda_give_the_same_outputs():
    from torch.sparse import SparseSemiStructuredTensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    result = ptsparse.sparsify(model, torch.randn(64, 256), method="magnitude", pattern="2:4", progress=False)
    swapped, report = to_semi_structured(result.model, "cuda")
    assert report["swapped"] == ["0"] and "2" in report["skipped"]  # 10 outputs: below the kernel's minimum
    assert isinstance(swapped[0].weight, SparseSemiStructuredTensor)
    x = torch.randn(64, 256)
    expected = result.model.cuda().half()(x.cuda().half())
    assert torch.allclose(swapped(x.cuda().half()), expected, rtol=1e-2, atol=1e-2)


def test_macs_and_params_are_counted_exactly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    with torch.no_grad():
        model[0].weight[0] = 0
    macs = count_macs(model, torch.zeros(2, 3, 5, 5))
    assert macs["macs"] == 25 * 4 * 3 * 9 + 100 * 2
    assert macs["nonzero_macs"] == 25 * 3 * 3 * 9 + 100 * 2
    assert count_params(model) == 4 * 27 + 4 + 200 + 2
    latency = measure_latency(model, (3, 5, 5), batch_size=2, warmup=0, repeats=3)
    assert latency["median_ms"] > 0 and latency["throughput"] > 0


def test_warnings_where_a_choice_gives_no_speedup(reference_90, reference_channels):
    unstructured = speedup_warnings(reference_90.model, "cpu", "unstructured")
    assert len(unstructured) == 1 and "no faster" in unstructured[0]
    assert any("no speedup" in w for w in speedup_warnings(reference_90.model, "cpu", "2:4"))
    assert any("too small" in w for w in speedup_warnings(reference_90.model, "cuda", "2:4"))
    channel = speedup_warnings(reference_channels.model, "cpu", "channel")
    assert len(channel) == 1 and "--format channels" in channel[0]
    assert speedup_warnings(load_reference(), "cpu") == []


def test_time_runs_computes_the_spread_of_the_timed_runs_only():
    from ptsparse.graph.cost import time_runs

    # run i takes durations[i] seconds on a fake clock; the two warm-up runs (100 s each) are not timed.
    durations = [100.0, 100.0, 0.013, 0.010, 0.050, 0.012, 0.011]
    now, calls = [0.0], []

    def run():
        now[0] += durations[len(calls)]
        calls.append(1)

    stats = time_runs(run, batch_size=4, warmup=2, repeats=5, clock=lambda: now[0])
    assert len(calls) == 7 and stats["runs"] == 5
    expected = {"median_ms": 12.0, "q1_ms": 11.0, "q3_ms": 13.0, "iqr_ms": 2.0, "min_ms": 10.0, "max_ms": 50.0}
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value), key
    assert stats["relative_iqr"] == pytest.approx(2 / 12)
    assert stats["throughput"] == pytest.approx(4 / 0.012)


def test_quartiles_interpolate_between_runs_like_numpy():
    from ptsparse.graph.cost import is_noisy, latency_stats

    stats = latency_stats([0.004, 0.001, 0.002, 0.003], batch_size=1)  # numpy.quantile: 1.75, 2.5, 3.25
    assert (stats["q1_ms"], stats["median_ms"], stats["q3_ms"]) == pytest.approx((1.75, 2.5, 3.25))
    assert is_noisy(stats)  # IQR 1.5 ms is 60% of the 2.5 ms median
    single = latency_stats([0.002], batch_size=1)
    assert single["iqr_ms"] == 0 and single["q1_ms"] == single["q3_ms"] == pytest.approx(2.0)
    assert not is_noisy(single)
    assert not is_noisy(latency_stats([0.100, 0.104, 0.106, 0.110], batch_size=1))  # IQR 3.5% of the median
    assert not is_noisy({"median_ms": 1.0, "throughput": 1.0})  # an older result without the spread


def test_measure_latency_reports_the_spread():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    latency = measure_latency(model, (4,), batch_size=2, warmup=0, repeats=5)
    assert latency["min_ms"] <= latency["q1_ms"] <= latency["median_ms"] <= latency["q3_ms"] <= latency["max_ms"]
    assert latency["iqr_ms"] == pytest.approx(latency["q3_ms"] - latency["q1_ms"]) and latency["runs"] == 5


def _timing(times_ms, batch=64):
    from ptsparse.graph.cost import latency_stats

    return latency_stats([t / 1e3 for t in times_ms], batch)


def _latency_result(baseline_ms, other_ms):
    rows = [{"model": name, "params": 10, "macs": 1e6, "nonzero_macs": 1e6,
             "latency": {"1": _timing([1.0, 1.0, 1.0]), "64": _timing(times)}}
            for name, times in (("dense", baseline_ms), ("compressed", other_ms))]
    return {"device": "cpu", "torch": "x", "threads": 2, "warmup": 0, "repeats": len(baseline_ms),
            "batch_sizes": [1, 64], "models": rows}


def test_a_speedup_within_the_spread_is_not_called_a_speedup():
    from ptsparse.export.latency import format_latency_table, speedups, within_spread

    # medians 820 and 400 ms (a 2.05x ratio), but the baseline's IQR [400, 1240] holds the other's [395, 405]
    result = _latency_result([236, 400, 820, 1240, 1620], [390, 395, 400, 405, 410])
    table = format_latency_table(result)
    assert "~1x (within spread)" in table and "2.05x" not in table
    assert "820.00 [400.00-1240.00]" in table and "interquartile range" in table
    assert speedups(result)[1]["64"] == {"ratio": pytest.approx(2.05), "within_spread": True}
    assert within_spread(result["models"][1]["latency"]["64"], result["models"][0]["latency"]["64"])


def test_a_speedup_outside_the_spread_gives_the_ratio():
    from ptsparse.export.latency import format_latency_table, speedups, within_spread

    result = _latency_result([800, 810, 820, 830, 840], [390, 395, 400, 405, 410])  # IQRs [810, 830], [395, 405]
    table = format_latency_table(result)
    assert "| 2.05x |" in table and "within spread" not in table and "1.00x (baseline)" in table
    assert speedups(result)[1]["64"] == {"ratio": pytest.approx(2.05), "within_spread": False}
    slower = _latency_result([390, 395, 400, 405, 410], [800, 810, 820, 830, 840])
    assert "| 0.49x |" in format_latency_table(slower)
    # intervals that only touch overlap; older results without quartiles compare by their medians
    assert within_spread({"q1_ms": 1.0, "q3_ms": 2.0}, {"q1_ms": 2.0, "q3_ms": 3.0})
    assert not within_spread({"median_ms": 1.0}, {"median_ms": 1.0})


def test_a_large_spread_warns_once():
    from ptsparse.export.latency import spread_warning

    assert spread_warning(_latency_result([800, 810, 820, 830, 840], [390, 395, 400, 405, 410])) is None
    message = spread_warning(_latency_result([236, 400, 820, 1240, 1620], [390, 395, 400, 405, 410]))
    assert "dense at batch 64 (102%)" in message and "compressed" not in message
    assert "busy" in message and "--repeats" in message and "\n" not in message


def test_bench_latency_prints_the_spread_and_warns_when_runs_vary(capsys, monkeypatch, tmp_path):
    import json

    from ptsparse.cli import main
    from ptsparse.export import latency as latency_module

    timings = iter([[10, 10.1, 10.2, 10.3, 10.4], [5, 8, 10, 20, 30]])  # the second model's IQR holds 10.2 ms
    monkeypatch.setattr(latency_module, "measure_latency",
                        lambda model, shape, batch, *rest: _timing(next(timings), batch))
    out = tmp_path / "latency.json"
    code = main(["bench-latency", "reference", "reference", "--batch-sizes", "1", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "~1x (within spread)" in captured.out and "10.00 [8.00-20.00]" in captured.out
    warnings = [line for line in captured.err.splitlines() if "timed runs vary" in line]
    assert len(warnings) == 1 and warnings[0].startswith("ptsparse: warning: ")
    assert "reference at batch 1 (120%)" in warnings[0]
    rows = json.loads(out.read_text())["models"]
    assert {"median_ms", "throughput", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "max_ms"} <= set(rows[1]["latency"]["1"])
    assert rows[1]["speedup"]["1"]["within_spread"] and rows[1]["latency"]["1"]["iqr_ms"] == pytest.approx(12.0)


def test_output_checks_are_relative_to_the_output_scale_and_give_the_difference():
    from ptsparse.export.base import check_outputs

    reference = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 1e4  # large logits
    reordered = reference + 2e-6 * reference.abs().max() * torch.randn(4, 1000, generator=torch.Generator())
    assert check_outputs(reordered, reference, 1e-4, "check") < 1e-4  # rtol 1e-4 / atol 1e-5 refused this
    broken = reference.clone()
    broken[0, 0] += 0.01 * reference.abs().max()
    with pytest.raises(ExportError, match=r"largest output difference .* is 0.01 of the largest output magnitude"):
        check_outputs(broken, reference, 1e-4, "check")
    with pytest.raises(ExportError, match=r"output shape \(4, 999\) instead of \(4, 1000\)"):
        check_outputs(reference[:, :999], reference, 1e-4, "check")
