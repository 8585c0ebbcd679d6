"""Readers of the dataset formats a user may bring, each turning a folder into one `Dataset`.

Every reader is `read(directory, image_size) -> Dataset` and is listed in `READERS` under the name
params.yaml uses. `image_size` matters only to formats whose images may differ in size (an image
folder); the others return their images at their native size.
"""

from collections.abc import Callable
from pathlib import Path

from dfkd.data import Dataset
from dfkd.readers import cifar, embedded, idx, image_folder

READERS: dict[str, Callable[[Path, int], Dataset]] = {
    "embedded": embedded.read,
    "idx": idx.read,
    "cifar10": cifar.read_cifar10,
    "cifar100": cifar.read_cifar100,
    "image_folder": image_folder.read,
}
