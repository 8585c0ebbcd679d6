"""The dataset readers, each on small files written here in its format's exact layout."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from dfkd.data import DataError
from dfkd.readers import READERS, cifar, embedded, idx, image_folder

ROW = 3 * 32 * 32


def test_the_registry_names_every_reader():
    assert READERS == {
        "embedded": embedded.read,
        "idx": idx.read,
        "cifar10": cifar.read_cifar10,
        "cifar100": cifar.read_cifar100,
        "image_folder": image_folder.read,
    }


def test_embedded_mnist_is_5000_digits_with_mnist_statistics(tmp_path):
    dataset = embedded.read(tmp_path, 32)
    assert dataset.train.images.shape == (5000, 28, 28, 1) and dataset.train.images.dtype == np.uint8
    assert dataset.train.labels.dtype == np.int64 and np.bincount(dataset.train.labels).tolist() == [500] * 10
    assert dataset.test is None and dataset.class_names == [str(digit) for digit in range(10)]
    assert (dataset.mean, dataset.std) == ((0.1307,), (0.3081,))


# --- IDX -------------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray, type_code: int = 0x08) -> None:
    """Two zero bytes, a type code, the number of dimensions, big-endian uint32 sizes, the data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_idx_folder(folder, rng, suffix="", labels_mod=10):
    arrays = {}
    for prefix, count in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % labels_mod).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = images, labels
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_folder_round_trips(tmp_path, suffix):
    arrays = write_idx_folder(tmp_path, np.random.default_rng(0), suffix)
    dataset = idx.read(tmp_path, 32)
    for split, prefix in ((dataset.train, "train"), (dataset.test, "t10k")):
        images, labels = arrays[prefix]
        assert split.images.shape == (*images.shape, 1) and split.images.dtype == np.uint8
        assert np.array_equal(split.images[..., 0], images)
        assert split.labels.dtype == np.int64 and split.labels.tolist() == labels.tolist()
    assert dataset.class_names == [str(digit) for digit in range(10)]
    assert dataset.mean is None and dataset.std is None


def test_idx_class_names_come_from_classes_txt_and_bound_the_labels(tmp_path):
    write_idx_folder(tmp_path, np.random.default_rng(0), labels_mod=4)
    (tmp_path / "classes.txt").write_text("T-shirt/top\nTrouser\nPullover\nDress\n\n")
    assert idx.read(tmp_path, 28).class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    (tmp_path / "classes.txt").write_text("T-shirt/top\nTrouser\nPullover\n")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: labels must lie in 0\.\.2"):
        idx.read(tmp_path, 28)


def test_idx_reader_reads_other_types_and_names_malformed_files(tmp_path):
    values = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    write_idx(tmp_path / "ints", values, type_code=0x0C)
    assert np.array_equal(idx.read_idx(tmp_path / "ints"), values)
    (tmp_path / "bad-magic").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad-magic: not an IDX file"):
        idx.read_idx(tmp_path / "bad-magic")
    write_idx(tmp_path / "truncated", np.zeros((5, 28, 28), dtype=np.uint8))
    (tmp_path / "truncated").write_bytes((tmp_path / "truncated").read_bytes()[:-100])
    with pytest.raises(DataError, match=r"truncated: header declares shape \(5, 28, 28\)"):
        idx.read_idx(tmp_path / "truncated")
    (tmp_path / "fake.gz").write_bytes(b"plain bytes")
    with pytest.raises(DataError, match="fake.gz: cannot be read"):
        idx.read_idx(tmp_path / "fake.gz")
    with pytest.raises(DataError, match="missing IDX file train-images-idx3-ubyte"):
        idx.read(tmp_path, 28)


# --- CIFAR -----------------------------------------------------------------------------------


class Python2Pickler(pickle._Pickler):
    """Pickles as the CIFAR python batches were pickled, by Python 2 with numpy 1: protocol 2,
    strings (numpy's dtype codes among them) as Python 2 str opcodes, numpy's globals under numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, value: bytes):
        if len(value) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(value)]) + value)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(value)) + value)
        self.memoize(value)

    def save_ascii_str(self, value: str):
        self.save_python2_str(value.encode("ascii"))

    dispatch[bytes] = save_python2_str
    dispatch[str] = save_ascii_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump_python2(path, content: dict) -> None:
    with open(path, "wb") as handle:
        Python2Pickler(handle, protocol=2).dump(content)


def dump_python3(path, content: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=4)


def cifar_rows(rng, count):
    return rng.integers(0, 256, (count, ROW), dtype=np.uint8)


def assert_planar_images(images, rows):
    """images[n, y, x, c] is byte c * 1024 + y * 32 + x of row n."""
    assert images.shape == (len(rows), 32, 32, 3) and images.dtype == np.uint8
    assert images[0, 0, 0, 0] == rows[0, 0] and images[0, 0, 1, 0] == rows[0, 1] and images[0, 1, 0, 0] == rows[0, 32]
    assert images[-1, 31, 31, 2] == rows[-1, ROW - 1] and images[-1, 2, 5, 1] == rows[-1, 1024 + 2 * 32 + 5]
    assert np.array_equal(images, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = [f"fine{number}" for number in range(100)]


def write_cifar10_python(folder, rng, dump):
    folder.mkdir(parents=True)
    names = [name.encode() for name in CIFAR10_NAMES]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 3, b"num_vis": ROW})
    written = {}
    for name in [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]:
        rows, labels = cifar_rows(rng, 3), rng.integers(0, 10, 3).tolist()
        filenames = [f"{name}_{index}.png".encode() for index in range(3)]
        content = {b"batch_label": f"{name} of 6".encode(), b"labels": labels, b"data": rows, b"filenames": filenames}
        dump(folder / name, content)
        written[name] = rows, labels
    return written


@pytest.mark.parametrize("dump", [dump_python2, dump_python3], ids=["python2-pickles", "python3-pickles"])
@pytest.mark.parametrize("point_at_archive_folder", [True, False])
def test_cifar10_python_version_round_trips(tmp_path, dump, point_at_archive_folder):
    written = write_cifar10_python(tmp_path / "cifar-10-batches-py", np.random.default_rng(0), dump)
    dataset = cifar.read_cifar10(tmp_path / "cifar-10-batches-py" if point_at_archive_folder else tmp_path, 32)
    train_rows = np.concatenate([written[f"data_batch_{number}"][0] for number in range(1, 6)])
    assert_planar_images(dataset.train.images, train_rows)
    assert dataset.train.labels.dtype == np.int64
    assert dataset.train.labels.tolist() == sum((written[f"data_batch_{number}"][1] for number in range(1, 6)), [])
    assert_planar_images(dataset.test.images, written["test_batch"][0])
    assert dataset.test.labels.tolist() == written["test_batch"][1]
    assert dataset.class_names == CIFAR10_NAMES
    assert (dataset.mean, dataset.std) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@pytest.mark.parametrize("dump", [dump_python2, dump_python3], ids=["python2-pickles", "python3-pickles"])
def test_cifar100_python_version_round_trips_with_fine_labels(tmp_path, dump):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [name.encode() for name in CIFAR100_NAMES]
    dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"coarse"] * 20})
    written = {}
    for name, count in (("train", 7), ("test", 4)):
        rows, fine = cifar_rows(rng, count), rng.integers(0, 100, count).tolist()
        content = {
            b"filenames": [b"x.png"] * count,
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [label // 5 for label in fine],
            b"data": rows,
        }
        dump(folder / name, content)
        written[name] = rows, fine
    dataset = cifar.read_cifar100(tmp_path, 32)
    assert_planar_images(dataset.train.images, written["train"][0])
    assert dataset.train.labels.tolist() == written["train"][1]
    assert_planar_images(dataset.test.images, written["test"][0])
    assert dataset.test.labels.tolist() == written["test"][1]
    assert dataset.class_names == CIFAR100_NAMES
    assert (dataset.mean, dataset.std) == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def write_records(path, label_columns: list[list[int]], rows: np.ndarray) -> None:
    labels = np.array(label_columns, dtype=np.uint8).T
    path.write_bytes(np.concatenate([labels, rows], axis=1).tobytes())


def test_cifar10_binary_version_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    written = {}
    for name in [f"data_batch_{number}.bin" for number in range(1, 6)] + ["test_batch.bin"]:
        rows, labels = cifar_rows(rng, 2), rng.integers(0, 10, 2).tolist()
        write_records(folder / name, [labels], rows)
        written[name] = rows, labels
    dataset = cifar.read_cifar10(tmp_path, 32)
    assert_planar_images(dataset.train.images, np.concatenate([written[f"data_batch_{n}.bin"][0] for n in range(1, 6)]))
    assert dataset.train.labels.tolist() == sum((written[f"data_batch_{n}.bin"][1] for n in range(1, 6)), [])
    assert_planar_images(dataset.test.images, written["test_batch.bin"][0])
    assert dataset.test.labels.tolist() == written["test_batch.bin"][1]
    assert dataset.class_names == CIFAR10_NAMES and dataset.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_binary_version_reads_the_fine_label(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "fine_label_names.txt").write_text("\n".join(CIFAR100_NAMES) + "\n")
    (tmp_path / "coarse_label_names.txt").write_text("\n".join(["coarse"] * 20) + "\n")
    written = {}
    for name, count in (("train.bin", 5), ("test.bin", 3)):
        rows, fine = cifar_rows(rng, count), rng.integers(0, 100, count).tolist()
        write_records(tmp_path / name, [[label // 5 for label in fine], fine], rows)
        written[name] = rows, fine
    dataset = cifar.read_cifar100(tmp_path, 32)
    assert_planar_images(dataset.train.images, written["train.bin"][0])
    assert dataset.train.labels.tolist() == written["train.bin"][1]
    assert_planar_images(dataset.test.images, written["test.bin"][0])
    assert dataset.test.labels.tolist() == written["test.bin"][1]
    assert dataset.class_names == CIFAR100_NAMES and dataset.std == (0.2673, 0.2564, 0.2762)


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_cifar_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder, np.random.default_rng(0), dump_python3)
    marker = tmp_path / "pwned"
    dump_python3(folder / "data_batch_1", {b"data": RunsACommand(f"touch {marker}"), b"labels": []})
    with pytest.raises(DataError, match=r"data_batch_1: refused to load the global (posix|os|nt)\.system"):
        cifar.read_cifar10(tmp_path, 32)
    assert not marker.exists()


def test_malformed_cifar_files_are_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES))
    rng = np.random.default_rng(4)
    for name in [f"data_batch_{number}.bin" for number in range(1, 6)] + ["test_batch.bin"]:
        write_records(folder / name, [[1, 2]], cifar_rows(rng, 2))
    (folder / "data_batch_3.bin").write_bytes((folder / "data_batch_3.bin").read_bytes()[:-1])
    with pytest.raises(DataError, match=r"data_batch_3\.bin: 6145 bytes is not a whole number of 3073-byte records"):
        cifar.read_cifar10(tmp_path, 32)
    write_records(folder / "data_batch_3.bin", [[1, 10]], cifar_rows(rng, 2))
    with pytest.raises(DataError, match=r"data_batch_3\.bin: labels must lie in 0\.\.9"):
        cifar.read_cifar10(tmp_path, 32)
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match=r"data_batch_3\.bin: missing"):
        cifar.read_cifar10(tmp_path, 32)
    with pytest.raises(DataError, match="no CIFAR-100 files: expected train"):
        cifar.read_cifar100(tmp_path, 32)
    python_folder = tmp_path / "python"
    write_cifar10_python(python_folder, rng, dump_python2)
    (python_folder / "test_batch").write_bytes((python_folder / "test_batch").read_bytes()[:100])
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR pickle"):
        cifar.read_cifar10(python_folder, 32)


# --- image folders ---------------------------------------------------------------------------


def save(path, pixels: np.ndarray, **options) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return pixels


def test_a_gray_image_folder_is_one_channel_and_exact(tmp_path):
    rng = np.random.default_rng(5)
    cat = save(tmp_path / "cat" / "b.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    cat_first = save(tmp_path / "cat" / "A.PNG", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    dog = save(tmp_path / "dog" / "1.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"not an image either")
    wide = rng.integers(0, 256, (6, 12), dtype=np.uint8)
    save(tmp_path / "dog" / "2.png", wide)
    dataset = image_folder.read(tmp_path, 8)
    assert dataset.class_names == ["cat", "dog"] and dataset.test is None
    assert dataset.mean is None and dataset.std is None
    assert dataset.train.images.shape == (4, 8, 8, 1) and dataset.train.images.dtype == np.uint8
    assert dataset.train.labels.tolist() == [0, 0, 1, 1] and dataset.train.labels.dtype == np.int64
    expected_wide = np.asarray(Image.fromarray(wide).resize((8, 8), Image.Resampling.BILINEAR))
    for image, pixels in zip(dataset.train.images, [cat_first, cat, dog, expected_wide]):
        assert np.array_equal(image[..., 0], pixels)


def test_gray_palettes_and_16_bit_images_count_as_gray(tmp_path):
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 90, 90, 90, 200, 200, 200])
    (tmp_path / "a").mkdir()
    palette.save(tmp_path / "a" / "palette.png")
    save(tmp_path / "b" / "deep.png", np.array([[0, 65535], [257, 25700]], dtype=np.uint16))
    dataset = image_folder.read(tmp_path, 2)
    assert dataset.train.images.shape == (2, 2, 2, 1)
    assert dataset.train.images[0, ..., 0].tolist() == [[0, 90], [200, 90]]
    assert dataset.train.images[1, ..., 0].tolist() == [[0, 255], [1, 100]]


def test_one_colour_image_makes_every_image_rgb(tmp_path):
    rng = np.random.default_rng(6)
    gray = save(tmp_path / "train" / "gray" / "g.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    rgba = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    save(tmp_path / "train" / "colour" / "c.png", rgba)
    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    photo = np.stack([smooth, smooth.T, 255 - smooth], axis=2)
    jpeg = save(tmp_path / "train" / "colour" / "photo.JPEG", photo, quality=95)
    test_gray = save(tmp_path / "test" / "gray" / "t.jpg", np.full((4, 4), 77, dtype=np.uint8), quality=95)
    save(tmp_path / "test" / "colour" / "t.png", rgba[..., :3])
    dataset = image_folder.read(tmp_path, 4)
    assert dataset.class_names == ["colour", "gray"]
    assert dataset.train.images.shape == (3, 4, 4, 3) and dataset.test.images.shape == (2, 4, 4, 3)
    assert dataset.train.labels.tolist() == [0, 0, 1] and dataset.test.labels.tolist() == [0, 1]
    assert np.array_equal(dataset.train.images[0], rgba[..., :3])  # alpha dropped
    expected_jpeg = np.asarray(Image.fromarray(jpeg).resize((4, 4), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(dataset.train.images[1].astype(int) - expected_jpeg).max() <= 12
    assert np.array_equal(dataset.train.images[2], np.repeat(gray[..., np.newaxis], 3, axis=2))
    assert np.abs(dataset.test.images[1].astype(int) - test_gray[..., np.newaxis]).max() <= 2


def test_image_folder_errors_name_the_file_or_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere: image folder does not exist"):
        image_folder.read(tmp_path / "nowhere", 8)
    with pytest.raises(DataError, match="no class subfolders"):
        image_folder.read(tmp_path, 8)
    save(tmp_path / "cat" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="dog: class folder holds no .png/.jpg/.jpeg images"):
        image_folder.read(tmp_path, 8)
    (tmp_path / "dog" / "x.png").write_bytes(b"\x00garbage bytes, not a picture")
    with pytest.raises(DataError, match=r"x\.png: not a readable PNG or JPEG image"):
        image_folder.read(tmp_path, 8)


def test_train_and_test_folders_need_the_same_classes(tmp_path):
    save(tmp_path / "train" / "cat" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    save(tmp_path / "train" / "dog" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    save(tmp_path / "test" / "cat" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    save(tmp_path / "test" / "cow" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    different = r"train/ and test/ must hold the same class folders, got \['cat', 'dog'\] and \['cat', 'cow'\]"
    with pytest.raises(DataError, match=different):
        image_folder.read(tmp_path, 8)


@pytest.mark.parametrize("limit", [40, 20])  # over the limit: Pillow warns; over twice the limit: it refuses
def test_decompression_bombs_are_refused(tmp_path, monkeypatch, limit):
    save(tmp_path / "cat" / "bomb.png", np.zeros((8, 8), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match=r"bomb\.png: refused, too many pixels"):
        image_folder.read(tmp_path, 8)
