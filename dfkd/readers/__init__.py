"""Readers of the dataset formats a user may bring, each turning a folder into one `Dataset`.

Every reader is `read(directory, image_size) -> Dataset` and is listed in `READERS` under the name
params.yaml uses. `image_size` matters only to formats whose images may differ in size (an image
folder); the others return their images at their native size.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dfkd.data import Split


@dataclass
class Dataset:
    train: Split
    test: Split | None  # None where the format has no test split of its own (prepare carves one out)
    class_names: list[str]
    # Per channel, of pixel values in [0, 1]: the dataset's published normalisation where one is
    # standard, else None (prepare computes it from train).
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


# The format modules import `Dataset` from this package, so they are imported once it is defined.
from dfkd.readers import cifar, embedded, idx, image_folder  # noqa: E402

READERS: dict[str, Callable[[Path, int], Dataset]] = {
    "embedded": embedded.read,
    "idx": idx.read,
    "cifar10": cifar.read_cifar10,
    "cifar100": cifar.read_cifar100,
    "image_folder": image_folder.read,
}
