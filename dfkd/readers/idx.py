"""MNIST-format IDX files: MNIST, Fashion-MNIST and the other datasets published the same way.

A folder holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
`t10k-labels-idx1-ubyte`, each optionally gzipped (`.gz`), as published and as the Debian package
dataset-fashion-mnist installs them (/usr/share/datasets/fashion-mnist).

The files hold no class names. They are read from a `classes.txt` in the folder (one name per line,
in label order) where there is one, else they are "0".."9": the files of MNIST and Fashion-MNIST
are identical in form, so Fashion-MNIST's names ("T-shirt/top", ...) need that `classes.txt`.
"""

import gzip
import os
from pathlib import Path

import numpy as np

from dfkd.data import DataError, Dataset, Split

# IDX type codes (http://yann.lecun.com/exdb/mnist/ format description) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CLASS_NAMES_FILE = "classes.txt"


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


def read(directory: Path, image_size: int) -> Dataset:
    """The train and test (t10k) splits of an IDX download; `image_size` is not used."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory does not exist")
    class_names = _class_names(directory)
    return Dataset(
        train=_split(directory, "train", class_names),
        test=_split(directory, "t10k", class_names),
        class_names=class_names,
        mean=None,
        std=None,
    )


def _class_names(directory: Path) -> list[str]:
    path = directory / CLASS_NAMES_FILE
    if not path.is_file():
        return [str(digit) for digit in range(10)]
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot be read ({error})") from error
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"{path}: expected at least two distinct class names, one per line, got {names}")
    return names


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory}: missing IDX file {stem} (or {stem}.gz)")


def _split(directory: Path, prefix: str, class_names: list[str]) -> Split:
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(
            f"{labels_path}: labels must lie in 0..{len(class_names) - 1} (one per class name), "
            f"found {labels.min()}..{labels.max()}"
        )
    return Split(images[..., np.newaxis], labels.astype(np.int64))
