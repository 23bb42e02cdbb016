"""Calibration sampling, input kinds, image folders and Fashion-MNIST IDX files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ptsparse.data import (Calibration, FashionMNIST, ImageFolder, ImageTransform, TensorSource, TextLines,
                           as_calibration, has_labels, load_source, sample_calibration, sample_indices)
from ptsparse.data.fashion_mnist import read_idx
from ptsparse.errors import CalibrationError, DataError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# sample_indices -------------------------------------------------------------------------------------

def test_sample_indices_deterministic_distinct_sorted():
    first = sample_indices(1000, 64, seed=0)
    assert torch.equal(first, sample_indices(1000, 64, seed=0))
    assert not torch.equal(first, sample_indices(1000, 64, seed=1))
    assert first.dtype == torch.int64 and first.shape == (64,)
    assert len(first.unique()) == 64
    assert torch.equal(first, first.sort().values)
    assert int(first.min()) >= 0 and int(first.max()) < 1000


def test_sample_indices_whole_population():
    assert torch.equal(sample_indices(10, 10, seed=3), torch.arange(10))


@pytest.mark.parametrize("size", [0, -1, 11])
def test_sample_indices_size_out_of_range(size):
    with pytest.raises(CalibrationError, match=str(size)):
        sample_indices(10, size, seed=0)


def test_balanced_sampling_gives_equal_counts_per_class():
    labels = torch.arange(400) % 4
    indices = sample_indices(400, 40, seed=0, labels=labels, balanced=True)
    assert len(indices.unique()) == 40
    assert torch.bincount(labels[indices], minlength=4).tolist() == [10, 10, 10, 10]
    assert torch.equal(indices, sample_indices(400, 40, seed=0, labels=labels, balanced=True))
    assert not torch.equal(indices, sample_indices(400, 40, seed=5, labels=labels, balanced=True))


def test_balanced_sampling_remainder_goes_to_first_classes():
    labels = torch.arange(300) % 3
    indices = sample_indices(300, 14, seed=1, labels=labels, balanced=True)
    assert torch.bincount(labels[indices], minlength=3).tolist() == [5, 5, 4]


def test_balanced_sampling_small_class_gives_all_it_has():
    labels = torch.tensor([0] * 50 + [1] * 50 + [2] * 2)
    indices = sample_indices(102, 30, seed=0, labels=labels, balanced=True)
    counts = torch.bincount(labels[indices], minlength=3).tolist()
    assert len(indices.unique()) == 30 and counts[2] == 2 and counts[0] >= 10 and counts[1] >= 10
    assert sum(counts) == 30


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, -1, 0]), torch.tensor([0, 1])])
def test_balanced_sampling_needs_labels(labels):
    with pytest.raises(CalibrationError, match="label"):
        sample_indices(4, 2, seed=0, labels=labels, balanced=True)


# as_calibration -------------------------------------------------------------------------------------

@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(10, 1, 4, 4, generator=generator), torch.arange(10) % 3


def test_as_calibration_tensor(xy):
    x, _ = xy
    calibration = as_calibration(x)
    assert isinstance(calibration, Calibration) and len(calibration) == 10
    assert torch.equal(calibration.inputs, x) and calibration.labels is None
    assert calibration.hash == as_calibration(x.clone()).hash
    assert calibration.hash != as_calibration(x + 1).hash


def test_as_calibration_list_of_tensors(xy):
    x, _ = xy
    calibration = as_calibration([x[:4], x[4:7], x[7:]])
    assert torch.equal(calibration.inputs, x) and calibration.labels is None


def test_as_calibration_list_of_tuples(xy):
    x, y = xy
    calibration = as_calibration([(x[:4], y[:4]), (x[4:], y[4:])])
    assert torch.equal(calibration.inputs, x) and torch.equal(calibration.labels, y)


def test_as_calibration_tuples_with_extra_items(xy):
    x, y = xy
    calibration = as_calibration([(x[:5], y[:5], "meta"), (x[5:], y[5:], "meta")])
    assert torch.equal(calibration.inputs, x) and torch.equal(calibration.labels, y)


def test_as_calibration_dataloader(xy):
    x, y = xy
    calibration = as_calibration(DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False))
    assert torch.equal(calibration.inputs, x) and torch.equal(calibration.labels, y)


def test_as_calibration_dataloader_without_labels(xy):
    x, _ = xy
    calibration = as_calibration(DataLoader(TensorDataset(x), batch_size=4))
    assert torch.equal(calibration.inputs, x) and calibration.labels is None


def test_as_calibration_dataset_of_pairs(xy):
    x, y = xy
    calibration = as_calibration(TensorDataset(x, y))
    assert torch.equal(calibration.inputs, x) and torch.equal(calibration.labels, y)
    assert calibration.hash == as_calibration(x).hash  # hashed by its inputs, like a tensor
    assert calibration.hash != as_calibration(TensorDataset(x + 1, y)).hash
    unlabelled = as_calibration(TensorSource(x))
    assert torch.equal(unlabelled.inputs, x) and unlabelled.labels is None


def test_as_calibration_unlabelled_dataset(xy):
    """Labels are optional: a Dataset whose items are ``(x,)`` gives the inputs and no labels."""
    x, _ = xy
    calibration = as_calibration(TensorDataset(x))
    assert torch.equal(calibration.inputs, x) and calibration.labels is None


def test_as_calibration_passes_a_calibration_through(xy):
    calibration = as_calibration(xy[0])
    assert as_calibration(calibration) is calibration


@pytest.mark.parametrize("empty", [
    torch.empty(0, 1, 4, 4),
    torch.tensor(1.0),
    [],
    [torch.empty(0, 3)],
    DataLoader(TensorDataset(torch.empty(0, 3)), batch_size=2),
    TensorDataset(torch.empty(0, 3), torch.empty(0)),
])
def test_as_calibration_empty_raises(empty):
    with pytest.raises(CalibrationError, match="empty"):
        as_calibration(empty)


@pytest.mark.parametrize("bad", [42, [1, 2, 3], [("x", "y")]])
def test_as_calibration_unsupported_raises(bad):
    with pytest.raises(CalibrationError):
        as_calibration(bad)


def test_calibration_batches_in_order_and_shuffled(xy):
    x, y = xy
    calibration = as_calibration([(x, y)])
    batches = list(calibration.batches(4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    shuffled = list(calibration.batches(4, torch.Generator().manual_seed(0)))
    again = list(calibration.batches(4, torch.Generator().manual_seed(0)))
    xs, ys = torch.cat([b[0] for b in shuffled]), torch.cat([b[1] for b in shuffled])
    assert torch.equal(xs, torch.cat([b[0] for b in again]))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(xs, x[order]) and torch.equal(ys, y[order])


def test_sample_calibration_from_a_source(xy):
    x, y = xy
    source = TensorSource(x, y)
    calibration = sample_calibration(source, 6, seed=2)
    indices = sample_indices(10, 6, seed=2)
    assert torch.equal(calibration.indices, indices)
    assert torch.equal(calibration.inputs, x[indices]) and torch.equal(calibration.labels, y[indices])
    assert calibration.hash == sample_calibration(source, 6, seed=2).hash
    assert calibration.hash != sample_calibration(source, 6, seed=3).hash


def test_tensor_source_checks_lengths(xy):
    x, y = xy
    with pytest.raises(CalibrationError, match="9"):
        TensorSource(x, y[:9])
    with pytest.raises(CalibrationError):
        TensorSource(torch.empty(0, 2))


# image folders --------------------------------------------------------------------------------------

@pytest.fixture
def image_root(tmp_path) -> Path:
    from PIL import Image

    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("L", (20, 30), 100).save(root / "cat" / "a.png")
    Image.new("RGB", (40, 16), (255, 0, 0)).save(root / "cat" / "b.png")
    Image.new("L", (28, 28), 200).save(root / "dog" / "c.png")
    Image.new("RGB", (9, 12), (0, 0, 255)).save(root / "dog" / "d.PNG")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_reads_class_folders(image_root):
    data = ImageFolder(image_root, crop=8, channels=1)
    assert data.classes == ["cat", "dog"]
    assert len(data) == 4
    assert data.labels.tolist() == [0, 0, 1, 1]
    for index in range(4):
        x, label = data[index]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32
        assert label == data.labels[index]
    assert torch.allclose(data[0][0], torch.full((1, 8, 8), 100 / 255), atol=1e-6)
    assert torch.allclose(data[2][0], torch.full((1, 8, 8), 200 / 255), atol=1e-6)


def test_image_folder_rgb_and_normalisation(image_root):
    data = ImageFolder(image_root, crop=6, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    red, label = data[1]
    assert red.shape == (3, 6, 6) and label == 0
    assert torch.allclose(red[0], torch.ones(6, 6)) and torch.allclose(red[1:], -torch.ones(2, 6, 6))
    blue, label = data[3]
    assert label == 1 and torch.allclose(blue[2], torch.ones(6, 6)) and torch.allclose(blue[:2], -torch.ones(2, 6, 6))


def test_image_folder_upscales_small_images(image_root):
    x, _ = ImageFolder(image_root, crop=16, channels=1)[3]  # 9x12 image, shorter side below the crop
    assert x.shape == (1, 16, 16)


def test_image_folder_errors(tmp_path, image_root):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "absent")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(DataError, match="2"):
        ImageFolder(image_root, channels=2)


def test_image_folder_unreadable_image_raises_data_error(image_root):
    (image_root / "cat" / "broken.png").write_bytes(b"not a png")
    data = ImageFolder(image_root, crop=8)
    broken = [i for i, (path, _) in enumerate(data.samples) if path.name == "broken.png"][0]
    with pytest.raises(DataError, match="broken.png"):
        data[broken]


def test_load_source_prefers_train_subfolder(tmp_path, image_root):
    (tmp_path / "split").mkdir()
    image_root.rename(tmp_path / "split" / "train")
    data = load_source(tmp_path / "split", split="train", image_size=8)
    assert isinstance(data, ImageFolder) and data.root == tmp_path / "split" / "train"
    with pytest.raises(DataError, match="absent"):
        load_source(tmp_path / "absent")


def test_load_source_normalises_greyscale_like_fashion_mnist(image_root):
    grey = load_source(image_root, image_size=8)[0][0]  # a solid 100/255 image
    assert torch.allclose(grey, torch.full((1, 8, 8), (100 / 255 - 0.2860) / 0.3530), atol=1e-5)
    rgb = load_source(image_root, image_size=8, channels=3)[1][0]  # solid red, scaled to [0, 1] only
    assert torch.allclose(rgb[0], torch.ones(8, 8)) and torch.allclose(rgb[1:], torch.zeros(2, 8, 8))


def test_sample_calibration_from_image_folder(image_root):
    calibration = sample_calibration(ImageFolder(image_root, crop=8), 2, seed=0, balanced=True)
    assert calibration.inputs.shape == (2, 1, 8, 8)
    assert sorted(calibration.labels.tolist()) == [0, 1]


def test_image_transform_resizes_the_shorter_side_then_centre_crops():
    from PIL import Image

    # a 40x20 image: left half black, right half white; shorter side 20 -> 10, so 20x10, centre 10x10 crop
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 20:] = 255
    x = ImageTransform(crop=10, resize=10, channels=3, mean=(0.5,), std=(0.5,), interpolation="nearest")(
        Image.fromarray(array))
    assert x.shape == (3, 10, 10)
    assert torch.equal(x[:, :, :5], -torch.ones(3, 10, 5)) and torch.equal(x[:, :, 5:], torch.ones(3, 10, 5))
    assert ImageTransform(crop=8, resize=12, channels=1).describe()["resize"] == 12


@pytest.mark.parametrize("bad", [dict(crop=0), dict(crop=8, channels=2), dict(crop=8, interpolation="cubic"),
                                 dict(crop=8, channels=3, mean=(0.1, 0.2))])
def test_image_transform_rejects_bad_settings(bad):
    with pytest.raises(DataError):
        ImageTransform(**bad)


def test_image_folder_with_a_model_transform(image_root):
    seen = []

    def transform(image):
        seen.append(image.mode)
        return torch.zeros(3, 5, 5)

    data = ImageFolder(image_root, transform=transform)
    x, label = data[0]
    assert x.shape == (3, 5, 5) and label == 0 and seen == ["RGB"]  # given the image in RGB
    assert load_source(image_root, transform=transform)[3][0].shape == (3, 5, 5)
    with pytest.raises(DataError, match="not a tensor"):
        ImageFolder(image_root, transform=lambda image: image)[0]


def test_flat_image_folder_has_no_labels(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (10, 12), (i * 50, 0, 0)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "readme.txt").write_text("not an image")
    data = ImageFolder(tmp_path, crop=8, channels=3)
    assert len(data) == 3 and data.classes == [] and data.labels.tolist() == [-1, -1, -1]
    assert data[1][1] == -1 and not has_labels(data)
    calibration = sample_calibration(data, 2, seed=0)
    assert calibration.inputs.shape == (2, 3, 8, 8) and calibration.labels is None
    with pytest.raises(CalibrationError, match="label"):
        sample_calibration(data, 2, seed=0, balanced=True)


def test_has_labels(image_root):
    assert has_labels(ImageFolder(image_root, crop=4))
    assert has_labels(TensorSource(torch.zeros(2, 3), torch.tensor([0, 1])))
    assert not has_labels(TensorSource(torch.zeros(2, 3)))


def fake_tokenizer(lines, seq_len):
    """Token ids = word lengths, padded with 0: a stand-in for a Hugging Face tokenizer."""
    ids = torch.zeros(len(lines), seq_len, dtype=torch.long)
    for row, line in enumerate(lines):
        lengths = [len(word) for word in line.split()][:seq_len]
        ids[row, :len(lengths)] = torch.tensor(lengths)
    return ids


def test_text_lines_one_sample_per_line(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("a bb ccc\n\n  \ndddd e\nf gg hhh iiii jjjjj\n")
    data = TextLines(path, fake_tokenizer, seq_len=4)
    assert len(data) == 3 and data.lines[1] == "dddd e" and not has_labels(data)
    assert data[0][0].tolist() == [1, 2, 3, 0] and data[0][1] == -1
    assert data[2][0].tolist() == [1, 2, 3, 4]  # truncated to seq_len
    via_source = load_source(f"text:{path}", tokenizer=fake_tokenizer, seq_len=4)
    calibration = sample_calibration(via_source, 3, seed=0)
    assert calibration.inputs.dtype == torch.int64 and calibration.inputs.shape == (3, 4)
    assert calibration.labels is None


def test_text_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer"):
        load_source(f"text:{tmp_path / 'x.txt'}")
    with pytest.raises(DataError, match="does not exist"):
        TextLines(tmp_path / "absent.txt", fake_tokenizer)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no non-blank line"):
        TextLines(tmp_path / "blank.txt", fake_tokenizer)
    (tmp_path / "ok.txt").write_text("a b\n")
    with pytest.raises(DataError, match="sequence length"):
        TextLines(tmp_path / "ok.txt", fake_tokenizer, seq_len=1)
    with pytest.raises(DataError, match="shape"):
        TextLines(tmp_path / "ok.txt", lambda lines, n: torch.zeros(len(lines), n + 1), seq_len=4)


# Fashion-MNIST IDX files ------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(idx_bytes(array))
    with gzip.open(tmp_path / "packed.gz", "wb") as handle:
        handle.write(idx_bytes(array))
    assert np.array_equal(read_idx(tmp_path / "plain"), array)
    assert np.array_equal(read_idx(tmp_path / "packed.gz"), array)


@pytest.mark.parametrize("name, content", [
    ("random", bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8))),
    ("short", b"\x00\x00"),
    ("bad-type", bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7])),
    ("truncated", idx_bytes(np.zeros((4, 5), dtype=np.uint8))[:-3]),
    ("too-long", idx_bytes(np.zeros((4, 5), dtype=np.uint8)) + b"\x00"),
    ("corrupt.gz", b"\x1f\x8b garbage that is not gzip"),
])
def test_read_idx_corrupt_raises_data_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=name):
        read_idx(path)


def test_fashion_mnist_missing_files_raise_with_install_hint(tmp_path):
    with pytest.raises(DataError) as info:
        FashionMNIST("train", root=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_fashion_mnist_bad_split(tmp_path):
    with pytest.raises(DataError, match="'valid'"):
        FashionMNIST("valid", root=tmp_path)


def write_fake_fashion_mnist(directory: Path, images: np.ndarray, labels: np.ndarray) -> None:
    (directory / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (directory / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 4], dtype=np.uint8)
    write_fake_fashion_mnist(tmp_path, images, labels)
    raw = FashionMNIST("test", root=tmp_path, normalize=False)
    assert len(raw) == 3 and raw.labels.tolist() == [9, 0, 4]
    x, y = raw[2]
    assert x.shape == (1, 28, 28) and int(y) == 4
    assert torch.allclose(x[0], torch.from_numpy(images[2]).float() / 255)
    normalized = FashionMNIST("test", root=tmp_path)
    assert torch.allclose(normalized[2][0], (x - 0.2860) / 0.3530)


def test_fashion_mnist_mismatched_files_raise(tmp_path):
    write_fake_fashion_mnist(tmp_path, np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="do not match"):
        FashionMNIST("test", root=tmp_path)


def test_fashion_mnist_environment_variable(tmp_path, monkeypatch):
    write_fake_fashion_mnist(tmp_path, np.zeros((2, 28, 28), np.uint8), np.array([1, 2], np.uint8))
    monkeypatch.setenv("PTSPARSE_FASHION_MNIST_DIR", str(tmp_path))
    assert FashionMNIST("test").labels.tolist() == [1, 2]


@pytest.mark.skipif(not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists()
                    and not (FASHION_MNIST / "t10k-images-idx3-ubyte").exists(),
                    reason="Fashion-MNIST files missing (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_test_split():
    data = FashionMNIST("test", root=FASHION_MNIST)
    assert len(data) == 10000
    x, y = data[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert data.labels.min() == 0 and data.labels.max() == 9
    assert torch.bincount(data.labels).tolist() == [1000] * 10
