"""Figures people look at: image grids by class, training curves, confusion matrices, comparisons
(PNG files)."""

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dfkd.checkpoint import atomic_path  # noqa: E402


def _save(figure: plt.Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def displayable(image: torch.Tensor) -> tuple:
    """imshow's arguments for one (C, H, W) image in a model's normalised input space: grayscale with
    its own contrast, or RGB stretched to [0, 1] (imshow clips colour images, it does not scale them)."""
    if image.shape[0] == 1:
        return image[0].cpu().numpy(), "gray"
    low, high = image.min(), image.max()
    return ((image - low) / (high - low).clamp_min(1e-12)).permute(1, 2, 0).cpu().numpy(), None


def save_class_grid(
    images: torch.Tensor,
    predicted: torch.Tensor,
    num_classes: int,
    path: str | os.PathLike,
    per_class: int = 8,
    title: str = "Samples by teacher-predicted class (count in the batch)",
) -> None:
    """One row per class with up to `per_class` of the images labelled with it (blank if none)."""
    figure, axes = plt.subplots(num_classes, per_class, figsize=(per_class * 0.8, num_classes * 0.8))
    for label in range(num_classes):
        members = images[predicted == label][:per_class]
        for column in range(per_class):
            axis = axes[label, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(members):
                axis.imshow(*displayable(members[column]))
            if column == 0:
                axis.set_ylabel(f"{label} ({int((predicted == label).sum())})", rotation=0, ha="right", va="center")
    figure.suptitle(title)
    _save(figure, path)


def save_curves(rows: list[dict[str, float]], path: str | os.PathLike, title: str) -> None:
    """Every metric of `rows` (dicts with a 'step' key) against the step, one panel each; with no
    rows (a method that trains nothing there), a figure that says so."""
    if not rows:
        figure, axis = plt.subplots(figsize=(4, 3))
        axis.text(0.5, 0.5, "no steps: nothing is trained here", ha="center", va="center")
        axis.set_axis_off()
        figure.suptitle(title)
        _save(figure, path)
        return
    names = [name for name in rows[0] if name != "step"]
    steps = [row["step"] for row in rows]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names):
        axis.plot(steps, [row[name] for row in rows])
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    _save(figure, path)


def save_matrix(
    matrix: np.ndarray,
    path: str | os.PathLike,
    title: str,
    axis_labels: tuple[str, str] = ("predicted", "actual"),
    value_format: str = "{:.0f}",
) -> None:
    """A class-by-class matrix (a confusion matrix by default) as a heatmap, nonzero cells labelled."""
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis)
    for (row, column), value in np.ndenumerate(matrix):
        if value:
            colour = "white" if value > matrix.max() / 2 else "black"
            axis.text(column, row, value_format.format(value), ha="center", va="center", fontsize=7, color=colour)
    axis.set_xticks(range(matrix.shape[1]))
    axis.set_yticks(range(matrix.shape[0]))
    axis.set_xlabel(axis_labels[0])
    axis.set_ylabel(axis_labels[1])
    axis.set_title(title)
    _save(figure, path)


def save_comparison(labels: list[str], values: dict[str, list[float]], path: str | os.PathLike, title: str) -> None:
    """Several series (e.g. student and teacher accuracy) side by side for each label, as grouped bars."""
    figure, axis = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.5))
    width = 0.8 / len(values)
    for offset, (name, series) in enumerate(values.items()):
        axis.bar(np.arange(len(labels)) + (offset - (len(values) - 1) / 2) * width, series, width, label=name)
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title)
    _save(figure, path)
