"""CIFAR-10 and CIFAR-100, in either of the two versions they are published in.

The python version (cifar-10-batches-py, cifar-100-python) holds pickled dicts; the binary version
(cifar-10-batches-bin, cifar-100-binary) holds fixed-size records of label bytes and 3072 pixel
bytes. Either way each image is a row of 3072 bytes: the red, green and blue 32x32 planes in turn.
The version is recognised by the files the folder holds; the folder may be the extracted archive
folder itself or the folder that contains it. CIFAR-100 is read with its 100 fine labels.

A pickle can run any code it names, so the batches are read by an unpickler that builds only the
objects the real files are made of (dicts, lists, bytes, strings and numpy uint8 arrays) and refuses
any other global a file asks for.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy._core.multiarray import _reconstruct

from dfkd.data import DataError, Dataset, Split

IMAGE_SIDE = 32
ROW_BYTES = 3 * IMAGE_SIDE * IMAGE_SIDE

# The published per-channel statistics of each training set, pixel values in [0, 1].
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# Every global the real batches name: a numpy array pickles as _reconstruct(ndarray, ...) plus its
# dtype. The files were written under numpy 1 (numpy.core); numpy 2 writes numpy._core.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


@dataclass(frozen=True)
class _PythonVersion:
    folder: str  # the folder its archive extracts to
    train: tuple[str, ...]
    test: str
    meta: str
    names_key: str  # in the meta dict: the class names, in label order
    labels_key: str  # in each batch dict


@dataclass(frozen=True)
class _BinaryVersion:
    folder: str
    train: tuple[str, ...]
    test: str
    names: str  # a text file of class names, one per line, in label order
    label_bytes: int  # label bytes before the pixels of each record; the last one is the label read


@dataclass(frozen=True)
class _Cifar:
    title: str
    python: _PythonVersion
    binary: _BinaryVersion
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10 = _Cifar(
    title="CIFAR-10",
    python=_PythonVersion(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{number}" for number in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        names_key="label_names",
        labels_key="labels",
    ),
    binary=_BinaryVersion(
        folder="cifar-10-batches-bin",
        train=tuple(f"data_batch_{number}.bin" for number in range(1, 6)),
        test="test_batch.bin",
        names="batches.meta.txt",
        label_bytes=1,
    ),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
CIFAR100 = _Cifar(
    title="CIFAR-100",
    python=_PythonVersion(
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        names_key="fine_label_names",
        labels_key="fine_labels",
    ),
    binary=_BinaryVersion(
        folder="cifar-100-binary",
        train=("train.bin",),
        test="test.bin",
        names="fine_label_names.txt",
        label_bytes=2,  # coarse, then fine
    ),
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
)


def read_cifar10(directory: Path, image_size: int) -> Dataset:
    """CIFAR-10's 50,000 train and 10,000 test images, 32x32 RGB; `image_size` is not used."""
    return _read(CIFAR10, Path(directory))


def read_cifar100(directory: Path, image_size: int) -> Dataset:
    """CIFAR-100's 50,000 train and 10,000 test images, 32x32 RGB, fine labels; `image_size` is not used."""
    return _read(CIFAR100, Path(directory))


def _read(cifar: _Cifar, directory: Path) -> Dataset:
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory does not exist")
    for folder in (directory, directory / cifar.python.folder, directory / cifar.binary.folder):
        if (folder / cifar.python.train[0]).is_file():
            return _read_python(cifar, folder)
        if (folder / cifar.binary.train[0]).is_file():
            return _read_binary(cifar, folder)
    raise DataError(
        f"{directory}: no {cifar.title} files: expected {cifar.python.train[0]} (python version) or "
        f"{cifar.binary.train[0]} (binary version) here or in {cifar.python.folder}/ or {cifar.binary.folder}/"
    )


def _read_python(cifar: _Cifar, folder: Path) -> Dataset:
    version = cifar.python
    meta_path = _existing(folder / version.meta, cifar.title)
    class_names = _names(_entry(_load_pickle(meta_path), version.names_key, meta_path), meta_path)

    def split(names: tuple[str, ...]) -> Split:
        images, labels = [], []
        for name in names:
            path = _existing(folder / name, cifar.title)
            batch = _load_pickle(path)
            rows = _entry(batch, "data", path)
            is_rows = isinstance(rows, np.ndarray) and rows.dtype == np.uint8 and rows.ndim == 2
            if not is_rows or rows.shape[1] != ROW_BYTES:
                found = f"{rows.dtype} {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
                raise DataError(f"{path}: 'data' must be a uint8 array of {ROW_BYTES}-byte rows, found {found}")
            batch_labels = np.asarray(_entry(batch, version.labels_key, path))
            if batch_labels.shape != (len(rows),) or not np.issubdtype(batch_labels.dtype, np.integer):
                raise DataError(f"{path}: '{version.labels_key}' must hold one integer per row ({len(rows)})")
            images.append(_planes_to_images(rows))
            labels.append(_checked_labels(batch_labels, len(class_names), path))
        return Split(np.concatenate(images), np.concatenate(labels))

    return Dataset(split(version.train), split((version.test,)), class_names, cifar.mean, cifar.std)


def _read_binary(cifar: _Cifar, folder: Path) -> Dataset:
    version = cifar.binary
    names_path = _existing(folder / version.names, cifar.title)
    try:
        lines = names_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{names_path}: cannot be read ({error})") from error
    class_names = [line.strip() for line in lines if line.strip()]
    record_bytes = version.label_bytes + ROW_BYTES

    def split(names: tuple[str, ...]) -> Split:
        images, labels = [], []
        for name in names:
            path = _existing(folder / name, cifar.title)
            try:
                raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
            except OSError as error:
                raise DataError(f"{path}: cannot be read ({error})") from error
            if raw.size == 0 or raw.size % record_bytes:
                raise DataError(
                    f"{path}: {raw.size} bytes is not a whole number of {record_bytes}-byte records "
                    f"({version.label_bytes} label byte(s) + {ROW_BYTES} pixel bytes): truncated or not {cifar.title}"
                )
            records = raw.reshape(-1, record_bytes)
            images.append(_planes_to_images(records[:, version.label_bytes :]))
            labels.append(_checked_labels(records[:, version.label_bytes - 1], len(class_names), path))
        return Split(np.concatenate(images), np.concatenate(labels))

    return Dataset(split(version.train), split((version.test,)), class_names, cifar.mean, cifar.std)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch, building no object beyond those in `_PICKLE_GLOBALS`.

    The files were pickled under Python 2, so their strings are read as bytes (`encoding="bytes"`,
    which keeps the pixel data intact); pickles written under Python 3 (protocol 3 or 4) read too.
    """

    def __init__(self, handle, path: Path):
        super().__init__(handle, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise DataError(
                f"{self.path}: refused to load the global {module}.{name}: a CIFAR batch holds only "
                "dicts, lists, strings and numpy arrays, and unpickling anything else could run code"
            )
        return _PICKLE_GLOBALS[module, name]


def _load_pickle(path: Path) -> dict:
    """The dict a CIFAR pickle holds, its bytes keys decoded to str."""
    try:
        with open(path, "rb") as handle:
            content = _CifarUnpickler(handle, path).load()
    except DataError:
        raise
    except Exception as error:  # a malformed pickle fails in many ways (EOFError, UnpicklingError, ...)
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(content).__name__}")
    return {key.decode("latin-1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _entry(content: dict, key: str, path: Path):
    if key not in content:
        raise DataError(f"{path}: no '{key}' entry (it holds {sorted(map(str, content))})")
    return content[key]


def _names(value, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(name, (bytes, str)) for name in value):
        raise DataError(f"{path}: the class names must be a list of strings")
    return [name.decode("utf-8", errors="replace") if isinstance(name, bytes) else name for name in value]


def _existing(path: Path, title: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: missing ({title} is read from all of its batch and class-name files)")
    return path


def _planes_to_images(rows: np.ndarray) -> np.ndarray:
    """Rows of red, green and blue 32x32 planes -> uint8 images (N, 32, 32, 3)."""
    planes = rows.reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1))


def _checked_labels(labels: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels must lie in 0..{num_classes - 1} (one per class name), "
            f"found {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.int64)
