"""Augmentation of normalised image batches, on whatever device they are."""

import math

import torch
import torch.nn.functional as F


def random_affine(
    images: torch.Tensor, max_shift: float, max_rotation: float = 0.0, max_scale: float = 0.0
) -> torch.Tensor:
    """Transform each image by its own random translation of up to `max_shift` pixels, rotation of up
    to `max_rotation` degrees and scaling by a factor in [1 - max_scale, 1 + max_scale], filling the
    uncovered border with the image's background (its lowest) value."""
    if max_shift <= 0 and max_rotation <= 0 and max_scale <= 0:
        return images
    batch, _, height, width = images.shape
    offsets = (torch.rand(batch, 2) * 2 - 1) * max_shift
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if max_rotation > 0:
        angles = (torch.rand(batch) * 2 - 1) * math.radians(max_rotation)
        theta[:, 0, 0] = theta[:, 1, 1] = angles.cos()
        theta[:, 0, 1], theta[:, 1, 0] = -angles.sin(), angles.sin()
    if max_scale > 0:
        # affine_grid maps output coordinates to input ones: dividing by s enlarges the content s times.
        theta[:, :, :2] /= (1 + (torch.rand(batch) * 2 - 1) * max_scale).view(batch, 1, 1)
    theta[:, 0, 2] = offsets[:, 0] * 2 / width  # affine_grid works in [-1, 1] coordinates
    theta[:, 1, 2] = offsets[:, 1] * 2 / height
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    background = images.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(images - background, grid, align_corners=False, padding_mode="zeros") + background
