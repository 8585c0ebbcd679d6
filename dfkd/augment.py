"""Augmentation of normalised image batches, on whatever device they are."""

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, max_shift: float) -> torch.Tensor:
    """Translate each image by its own random offset of up to `max_shift` pixels (zero-filled in
    the normalised space's background value)."""
    if max_shift <= 0:
        return images
    batch, _, height, width = images.shape
    offsets = (torch.rand(batch, 2) * 2 - 1) * max_shift
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = offsets[:, 0] * 2 / width  # affine_grid works in [-1, 1] coordinates
    theta[:, 1, 2] = offsets[:, 1] * 2 / height
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    background = images.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(images - background, grid, align_corners=False, padding_mode="zeros") + background
