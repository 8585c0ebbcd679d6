"""The split format and the preprocessing that turns its pixels into a model's input.

Split format: one `.npz` file per split holding two arrays,
  `images`: uint8, shape (N, H, W, C), 0-255, C = 1 (grayscale) or 3 (RGB);
  `labels`: int64, shape (N,), class indices 0..num_classes-1.
Loaded with `allow_pickle=False`, so a split file can never run code. The readers of each dataset
format are in dfkd/readers/.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.checkpoint import atomic_path
from dfkd.inputs import InputSpec


class DataError(ValueError):
    """A dataset file or directory that cannot be used; the message names it and says why."""


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """What a reader (dfkd/readers/) makes of a folder of the user's data."""

    train: Split
    test: Split | None  # None where the format has no test split of its own (prepare carves one out)
    class_names: list[str]
    # Per channel, of pixel values in [0, 1]: the dataset's published normalisation where one is
    # standard, else None (prepare computes it from train).
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


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
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images),):
        raise DataError(f"{path}: expected uint8 images (N, H, W, C) and N labels, got {images.shape} / {labels.shape}")
    return Split(images, labels.astype(np.int64))


def channel_statistics(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 (N, H, W, C) images, as pixel values in [0, 1]."""
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        pixels = images[start : start + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        total += pixels.sum(axis=0)
        squares += (pixels**2).sum(axis=0)
    count = images.size / images.shape[-1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def to_model_input(images: np.ndarray | torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, H, W, C) images -> the float32 (N, spec.channels, spec.size, spec.size) input of a
    model of `spec`, as the server preprocesses an upload: grayscale and RGB converted to the model's
    channels (ITU-R 601 luma, as Pillow's convert("L")), brought to its side as `spec.resize` says,
    normalised per channel."""
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[3] not in (1, 3) or shape[1] != shape[2]:
        raise DataError(f"expected square images of shape (N, H, W, 1 or 3), got {shape}")
    pixels = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if pixels.shape[1] == 3 and spec.channels == 1:
        pixels = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    elif pixels.shape[1] == 1 and spec.channels == 3:
        pixels = pixels.expand(-1, 3, -1, -1)
    side = pixels.shape[-1]
    if side != spec.size:
        if spec.resize == "pad" and side < spec.size:
            before = (spec.size - side) // 2
            after = spec.size - side - before
            pixels = F.pad(pixels, (before, after, before, after))
        else:
            pixels = F.interpolate(pixels, size=(spec.size, spec.size), mode="bilinear", antialias=True, align_corners=False)
    return spec.normalise(pixels)
