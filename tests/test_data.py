"""The split format, the input description (InputSpec) and the preprocessing of pixels into a model's
input. The dataset readers (IDX, CIFAR, image folders, the embedded MNIST) are in test_readers.py."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dfkd.checkpoint import atomic_path
from dfkd.data import DataError, Split, channel_statistics, load_split, save_split, stratified_split, to_model_input
from dfkd.inputs import InputSpec
from dfkd.readers import idx
from test_readers import write_idx

MNIST = InputSpec(channels=1, size=32, mean=(0.1307,), std=(0.3081,), class_names=tuple("0123456789"), resize="pad")
MEAN, STD = MNIST.mean[0], MNIST.std[0]


def rgb_spec(size: int = 32, resize: str = "bilinear") -> InputSpec:
    return InputSpec(channels=3, size=size, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261),
                     class_names=("cat", "dog"), resize=resize)


# --- the IDX checks test_readers.py does not make --------------------------------------------


def test_idx_errors_name_an_unknown_type_a_missing_folder_or_file_and_labels_out_of_range(tmp_path):
    (tmp_path / "unknown-type").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="unknown-type: unknown IDX data type code 0x07"):
        idx.read_idx(tmp_path / "unknown-type")
    with pytest.raises(DataError, match="nowhere: data directory does not exist"):
        idx.read(tmp_path / "nowhere", 32)
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 30), ("t10k", 10)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(count, dtype=np.uint8) % 10)
    (folder / "t10k-labels-idx1-ubyte").unlink()  # the train files are there: the test split's is named
    with pytest.raises(DataError, match="missing IDX file t10k-labels-idx1-ubyte"):
        idx.read(folder, 32)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.full(10, 12, dtype=np.uint8))  # no classes.txt: the digits
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: labels must lie in 0\.\.9"):
        idx.read(folder, 32)


# --- splits ----------------------------------------------------------------------------------


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = np.repeat(np.arange(10), 50)
    parts = stratified_split(labels, [0.7, 0.1], seed=3)
    assert [len(p) for p in parts] == [350, 50, 100]
    assert len(np.unique(np.concatenate(parts))) == 500
    for part, per_class in zip(parts, (35, 5, 10)):
        assert np.bincount(labels[part]).tolist() == [per_class] * 10
    again = stratified_split(labels, [0.7, 0.1], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[0], stratified_split(labels, [0.7, 0.1], seed=4)[0])


def test_split_file_round_trip_and_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    split = Split(images, np.arange(4))
    save_split(tmp_path / "s.npz", split)
    loaded = load_split(tmp_path / "s.npz")
    assert np.array_equal(loaded.images, images) and loaded.images.dtype == np.uint8
    assert np.array_equal(loaded.labels, split.labels) and loaded.labels.dtype == np.int64
    with pytest.raises(DataError, match="split file does not exist"):
        load_split(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz: not a valid split file"):
        load_split(tmp_path / "junk.npz")


def test_a_split_of_three_dimensional_images_is_refused(tmp_path):
    # (N, H, W) was the format before channels: such a file must be written again, not misread.
    save_split(tmp_path / "old.npz", Split(np.zeros((4, 28, 28), dtype=np.uint8), np.arange(4)))
    with pytest.raises(DataError, match=r"old.npz: expected uint8 images \(N, H, W, C\) and N labels, got \(4, 28, 28\)"):
        load_split(tmp_path / "old.npz")


def test_channel_statistics_are_per_channel_over_every_chunk():
    images = np.zeros((6, 4, 4, 2), dtype=np.uint8)
    images[:3, ..., 0] = 255  # channel 0: half the pixels white: mean 0.5, std 0.5
    images[..., 1] = 51  # channel 1: constant 0.2
    mean, std = channel_statistics(images, chunk=4)  # chunks of 4 and 2 images
    assert np.allclose(mean, (0.5, 0.2)) and np.allclose(std, (0.5, 0.0), atol=1e-5)
    random = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    mean, std = channel_statistics(random, chunk=7)
    pixels = random.reshape(-1, 3) / 255.0
    assert np.allclose(mean, pixels.mean(axis=0)) and np.allclose(std, pixels.std(axis=0))


# --- the input description -------------------------------------------------------------------


def test_input_spec_shape_classes_and_normalisation_round_trip():
    assert MNIST.shape == (1, 32, 32) and MNIST.num_classes == 10
    spec = rgb_spec(16)
    assert spec.shape == (3, 16, 16) and spec.num_classes == 2
    pixels = torch.rand(5, 3, 16, 16)
    inputs = spec.normalise(pixels)
    for channel in range(3):
        expected = (pixels[:, channel] - spec.mean[channel]) / spec.std[channel]
        assert torch.allclose(inputs[:, channel], expected)
    assert torch.allclose(spec.pixels(inputs), pixels, atol=1e-6)
    assert spec.pixels(torch.full((1, 3, 1, 1), -10.0)).min() < 0  # the inverse does not clip


def test_input_spec_validates_and_survives_json():
    with pytest.raises(ValidationError, match=r"mean needs one value per channel \(3\), got \[0.5\]"):
        InputSpec(channels=3, size=32, mean=(0.5,), std=(0.2, 0.2, 0.2), class_names=("a", "b"))
    with pytest.raises(ValidationError, match="std needs one value per channel"):
        InputSpec(channels=1, size=32, mean=(0.5,), std=(0.2, 0.2), class_names=("a", "b"))
    for bad in ({"channels": 2}, {"size": 4}, {"std": (0.0,)}, {"class_names": ("one",)}, {"resize": "crop"}, {"extra": 1}):
        with pytest.raises(ValidationError):
            InputSpec(**{**MNIST.model_dump(), **bad})
    assert rgb_spec().resize == "bilinear"  # the default
    assert InputSpec.model_validate_json(MNIST.model_dump_json()) == MNIST
    assert InputSpec(**MNIST.model_dump()) == MNIST
    with pytest.raises(ValidationError):  # frozen: one spec is shared by a checkpoint and its users
        MNIST.size = 28


# --- preprocessing ---------------------------------------------------------------------------


def test_model_input_pads_28_to_32_and_normalises():
    images = np.full((2, 28, 28, 1), 255, dtype=np.uint8)
    x = to_model_input(images, MNIST)
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0, 0, 0], torch.tensor(-MEAN / STD))  # padding is background
    assert torch.allclose(x[0, 0, 16, 16], torch.tensor((1 - MEAN) / STD))
    # The digit is centred: two background rows and columns on each side.
    digit = x[0, 0] > 0
    assert digit[2:30, 2:30].all() and digit.sum() == 28 * 28
    same = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 1), dtype=np.uint8)
    assert torch.allclose(to_model_input(same, MNIST), MNIST.normalise(torch.from_numpy(same).permute(0, 3, 1, 2) / 255.0))


def test_padding_centres_any_smaller_side_and_resizes_a_larger_one():
    x = to_model_input(np.full((1, 29, 29, 1), 255, dtype=np.uint8), MNIST)
    digit = x[0, 0] > 0
    assert digit.sum() == 29 * 29 and digit[1:30, 1:30].all()  # the odd pixel on the far side
    large = to_model_input(np.full((1, 40, 40, 1), 255, dtype=np.uint8), MNIST)
    assert large.shape == (1, 1, 32, 32)  # larger than the model's side: resized, not cropped
    assert torch.allclose(large, torch.tensor((1 - MEAN) / STD), atol=1e-5)


def test_bilinear_resize_brings_any_side_to_the_models():
    spec = rgb_spec(16)
    gradient = np.broadcast_to(np.linspace(0, 255, 32).astype(np.uint8)[None, None, :, None], (2, 32, 32, 3)).copy()
    x = to_model_input(gradient, spec)
    assert x.shape == (2, 3, 16, 16)
    pixels = spec.pixels(x)
    assert (pixels[0, 0, :, 1:] > pixels[0, 0, :, :-1]).all()  # the ramp survives the resize
    assert abs(pixels.mean().item() - gradient.mean() / 255.0) < 1e-2
    small = to_model_input(np.full((1, 8, 8, 3), 255, dtype=np.uint8), spec)  # upsampled, not padded
    assert torch.allclose(spec.pixels(small), torch.ones(1, 3, 16, 16), atol=1e-5)


def test_channels_are_converted_to_the_models():
    rgb = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    gray = MNIST.pixels(to_model_input(rgb, MNIST))  # ITU-R 601 luma, as Pillow's convert("L")
    assert gray.shape == (1, 1, 32, 32)
    assert torch.allclose(gray, torch.tensor((0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255.0), atol=1e-5)
    spec = rgb_spec(32)
    digit = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    colour = spec.pixels(to_model_input(digit, spec))  # gray -> RGB: the same value in every channel
    assert colour.shape == (2, 3, 32, 32)
    for channel in range(3):
        assert torch.allclose(colour[:, channel], torch.from_numpy(digit[..., 0]) / 255.0, atol=1e-5)


def test_images_that_are_not_square_gray_or_rgb_are_refused():
    with pytest.raises(DataError, match=r"expected square images of shape \(N, H, W, 1 or 3\), got \(1, 28, 30, 1\)"):
        to_model_input(np.zeros((1, 28, 30, 1), dtype=np.uint8), MNIST)
    with pytest.raises(DataError, match=r"got \(1, 28, 28, 2\)"):
        to_model_input(np.zeros((1, 28, 28, 2), dtype=np.uint8), MNIST)


def test_images_without_a_channel_axis_are_refused_with_a_data_error():
    with pytest.raises(DataError, match=r"expected square images of shape \(N, H, W, 1 or 3\), got \(1, 28, 28\)"):
        to_model_input(np.zeros((1, 28, 28), dtype=np.uint8), MNIST)


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("killed midway")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
