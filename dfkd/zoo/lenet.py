"""LeNet-5 as in DAFL's MNIST recipe (teacher) and LeNet-5-half (student): no batch norm."""

import torch
from torch import nn


class LeNet5(nn.Module):
    """conv5-pool-conv5-pool-conv5, then fc-fc; `width` scales every layer (0.5 is LeNet-5-half)."""

    feature_layer = "features"  # DAFL's f_T: the conv features, before both fully connected layers
    block_layers = ("features.2", "features.5", "features.8")  # each conv block, after its pooling

    def __init__(self, channels: int, image_size: int, num_classes: int, width: float):
        super().__init__()
        if image_size != 32:
            raise ValueError(f"LeNet-5 takes 32x32 inputs, got image_size={image_size}")
        c1, c2, c3, f1 = (max(1, round(n * width)) for n in (6, 16, 120, 84))
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, kernel_size=5),
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
        self.classifier = nn.Linear(f1, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.features(images)))


def lenet5(channels: int, image_size: int, num_classes: int, width: float = 1.0) -> LeNet5:
    return LeNet5(channels, image_size, num_classes, width)


def lenet5_half(channels: int, image_size: int, num_classes: int) -> LeNet5:
    return LeNet5(channels, image_size, num_classes, width=0.5)
