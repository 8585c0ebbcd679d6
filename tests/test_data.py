import gzip
import struct

import numpy as np
import pytest
import torch

from dfkd.checkpoint import atomic_path
from dfkd.data import (
    PIXEL_MEAN,
    PIXEL_STD,
    DataError,
    Split,
    load_embedded_mnist,
    load_idx_dataset,
    load_split,
    read_idx,
    save_split,
    stratified_split,
    to_model_input,
)


def write_idx(path, array: np.ndarray, type_code: int = 0x08, compress: bool = False) -> None:
    """The IDX format: two zero bytes, a type code, the number of dimensions, big-endian uint32 sizes."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist_dir(directory, rng, n_train=30, n_test=10, compress=False):
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress=compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10, compress=compress)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_dataset_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    write_mnist_dir(tmp_path, rng, compress=compress)
    train, test = load_idx_dataset(tmp_path)
    assert train.images.shape == (30, 28, 28) and train.images.dtype == np.uint8
    assert test.labels.tolist() == list(range(10))


def test_idx_reader_reads_other_types(tmp_path):
    values = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    write_idx(tmp_path / "ints", values, type_code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "ints"), values)


def test_malformed_idx_files_are_named_with_the_problem(tmp_path):
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad-magic: not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    write_idx(truncated, np.zeros((5, 28, 28), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"truncated: header declares shape \(5, 28, 28\)"):
        read_idx(truncated)
    unknown_type = tmp_path / "unknown-type"
    unknown_type.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="unknown IDX data type code 0x07"):
        read_idx(unknown_type)
    not_gzip = tmp_path / "fake.gz"
    not_gzip.write_bytes(b"plain bytes")
    with pytest.raises(DataError, match="fake.gz: cannot be read"):
        read_idx(not_gzip)


def test_idx_dataset_errors_name_the_missing_piece(tmp_path):
    with pytest.raises(DataError, match="data directory does not exist"):
        load_idx_dataset(tmp_path / "nowhere")
    write_mnist_dir(tmp_path, np.random.default_rng(0))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing IDX file t10k-labels-idx1-ubyte"):
        load_idx_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(10, 12, dtype=np.uint8))
    with pytest.raises(DataError, match=r"labels must lie in 0..9"):
        load_idx_dataset(tmp_path)


def test_embedded_mnist_is_the_real_balanced_subset():
    data = load_embedded_mnist()
    assert data.images.shape == (5000, 28, 28) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [500] * 10


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
    split = Split(np.zeros((4, 28, 28), dtype=np.uint8), np.arange(4))
    save_split(tmp_path / "s.npz", split)
    loaded = load_split(tmp_path / "s.npz")
    assert np.array_equal(loaded.labels, split.labels)
    with pytest.raises(DataError, match="split file does not exist"):
        load_split(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz: not a valid split file"):
        load_split(tmp_path / "junk.npz")


def test_model_input_pads_28_to_32_and_normalises():
    images = np.full((2, 28, 28), 255, dtype=np.uint8)
    x = to_model_input(images)
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0, 0, 0], torch.tensor(-PIXEL_MEAN / PIXEL_STD))  # padding is background
    assert torch.allclose(x[0, 0, 16, 16], torch.tensor((1 - PIXEL_MEAN) / PIXEL_STD))
    assert to_model_input(np.zeros((1, 32, 32), dtype=np.uint8)).shape == (1, 1, 32, 32)
    with pytest.raises(DataError, match="28x28 or 32x32"):
        to_model_input(np.zeros((1, 30, 30), dtype=np.uint8))


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("killed midway")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
