"""The networks of the MNIST recipe: LeNet-5 (teacher), LeNet-5-half (student) and DAFL's generator.

A classifier is rebuilt from a plain `ArchitectureConfig` dict stored next to its weights, so a
checkpoint loads with `torch.load(..., weights_only=True)` and no pickled classes.
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchitectureConfig:
    """Everything needed to rebuild a LeNet-5 of any width."""

    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 32  # LeNet-5's conv stack needs 32x32 to reach a 1x1 map before the classifier
    width: float = 1.0  # 1.0 is LeNet-5 (6, 16, 120, 84); 0.5 is LeNet-5-half (3, 8, 60, 42)

    def to_dict(self) -> dict:
        return asdict(self)


class LeNet5(nn.Module):
    """LeNet-5 as in DAFL: conv5-pool-conv5-pool-conv5, then fc-fc. No batch norm."""

    def __init__(self, config: ArchitectureConfig):
        super().__init__()
        if config.image_size != 32:
            raise ValueError(f"LeNet-5 takes 32x32 inputs, got image_size={config.image_size}")
        self.config = config
        c1, c2, c3, f1 = (max(1, round(n * config.width)) for n in (6, 16, 120, 84))
        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, c1, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, kernel_size=5),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(c3, f1), nn.ReLU())
        # The final linear layer is a named attribute: ZSKD reads its class weight vectors.
        self.classifier = nn.Linear(f1, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.features(images)))

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the conv features that feed the fully connected layers (DAFL's f_T)."""
        features = self.features(images)
        return self.classifier(self.hidden(features)), features


class Generator(nn.Module):
    """DAFL's generator: latent vector -> image in the teacher's normalised input space."""

    def __init__(self, latent_dim: int = 100, image_size: int = 32, channels: int = 1, width: int = 128):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"generator image_size must be a multiple of 4, got {image_size}")
        self.latent_dim = latent_dim
        self.channels = channels
        self.base_size = image_size // 4
        self.width = width
        self.project = nn.Linear(latent_dim, width * self.base_size**2)
        self.project_norm = nn.BatchNorm2d(width)
        self.upsample = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, padding=1),
            nn.Tanh(),
            # Without affine parameters the output keeps zero mean and unit variance per batch,
            # which is the statistics of a normalised real input.
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.project(latent).view(-1, self.width, self.base_size, self.base_size)
        return self.upsample(self.project_norm(x))
