"""A folder of class subfolders of PNG and JPEG images, the form most users' own images come in.

    root/<class name>/<any name>.png | .jpg | .jpeg   (extensions in any case)

If `root/train/` and `root/test/` both exist, each is such a folder (with the same class names) and
gives the train and test splits; otherwise `root` itself is the train split and there is no test
split. The class names are the subfolder names, sorted; an image's label is its folder's index.
Files of other extensions, and files and folders whose names start with "." (hidden), are ignored.

All images come out with one channel count: grayscale (1) if every image is grayscale, else RGB (3),
gray images then repeated across the three channels; alpha is dropped. An image of another size is
resized (bilinear) to image_size x image_size, not keeping its aspect ratio.
"""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dfkd.data import DataError, Dataset, Split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")  # what Pillow opens a 16-bit gray PNG as
_PALETTE_MODES = ("P", "PA")


def read(directory: Path, image_size: int) -> Dataset:
    """The images under `directory`, each image_size x image_size."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    if image_size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {image_size}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, class_names = _class_files(root / "train")
        test_files, test_class_names = _class_files(root / "test")
        if test_class_names != class_names:
            raise DataError(
                f"{root}: train/ and test/ must hold the same class folders, "
                f"got {class_names} and {test_class_names}"
            )
    else:
        train_files, class_names = _class_files(root)
        test_files = []
    # All are decoded before the channel count is known: 1 only if every image, train and test, is gray.
    train_images = [_pixels(path, image_size) for path, _ in tqdm(train_files, desc="train images", leave=False)]
    test_images = [_pixels(path, image_size) for path, _ in tqdm(test_files, desc="test images", leave=False)]
    channels = 1 if all(image.ndim == 2 for image in train_images + test_images) else 3
    train = _split(train_images, train_files, channels)
    test = _split(test_images, test_files, channels) if test_files else None
    return Dataset(train=train, test=test, class_names=class_names, mean=None, std=None)


def _class_files(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image path, label) for every image under `root`'s class folders, and the class names."""
    class_folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not class_folders:
        raise DataError(f"{root}: no class subfolders (expected {root}/<class name>/<image>.png)")
    files = []
    for label, folder in enumerate(class_folders):
        images = sorted(
            path
            for path in folder.iterdir()
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
        )
        if not images:
            raise DataError(f"{folder}: class folder holds no {'/'.join(IMAGE_EXTENSIONS)} images")
        files.extend((path, label) for path in images)
    return files, [folder.name for folder in class_folders]


def _pixels(path: Path, image_size: int) -> np.ndarray:
    """One image as uint8 (image_size, image_size) if it is grayscale, else (image_size, image_size, 3)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=("PNG", "JPEG")) as image:
                image.load()
                image = _gray_or_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"{path}: refused, too many pixels to decode safely ({error})") from error
    except (OSError, ValueError, TypeError, SyntaxError, EOFError) as error:
        raise DataError(f"{path}: not a readable PNG or JPEG image ({error})") from error
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _gray_or_rgb(image: Image.Image) -> Image.Image:
    """The image in mode L if its mode is a gray one (or a palette of grays only), else in mode RGB."""
    if image.mode in _GRAY_MODES:
        return image.convert("L")
    if image.mode in _SIXTEEN_BIT_MODES:
        # Scaled to 8 bits: Pillow's own conversion to L clips values above 255 instead.
        sixteen_bit = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(sixteen_bit / 257), 0, 255).astype(np.uint8))
    if image.mode in _PALETTE_MODES and _palette_is_gray(image):
        return image.convert("RGB").convert("L")
    return image.convert("RGB")


def _palette_is_gray(image: Image.Image) -> bool:
    """Whether every palette colour the image uses has equal red, green and blue."""
    palette = np.zeros((256, 3), dtype=np.uint8)  # Pillow shows the entries a short palette lacks as black
    colours = np.asarray(image.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)[:256]
    palette[: len(colours)] = colours
    used = palette[np.unique(np.asarray(image.getchannel(0)))]
    return bool(np.all(used == used[:, :1]))


def _split(images: list[np.ndarray], files: list[tuple[Path, int]], channels: int) -> Split:
    if channels == 1:
        stacked = np.stack(images)[..., np.newaxis]
    else:
        stacked = np.stack([np.stack([image] * 3, axis=2) if image.ndim == 2 else image for image in images])
    return Split(stacked, np.array([label for _, label in files], dtype=np.int64))
