"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k has a 3x3 stem of 16 channels, then three groups of (d - 4) / 6 pre-activation blocks at
16k, 32k and 64k channels (the second and third halve the resolution), a final BN-ReLU, global
average pooling and the classifier. WRN-40-2 -> WRN-16-2 is ZSKT's and DeepInversion's CIFAR pair.
"""

import torch
from torch import nn


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the input; where the width or the resolution
    changes, the shortcut is a 1x1 convolution of the pre-activated input, as in the paper's code."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.projection = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + (x if self.projection is None else self.projection(activated))


class WideResNet(nn.Module):
    """WRN-`depth`-`widen`; `dropout` is the rate between each block's two convolutions."""

    block_layers = ("groups.0", "groups.1", "groups.2")  # each group's output

    def __init__(self, channels: int, num_classes: int, depth: int, widen: int, dropout: float):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(channels, 16, kernel_size=3, padding=1, bias=False)
        groups, in_channels = [], 16
        for index, width in enumerate(widths):
            first = WideBlock(in_channels, width, stride=1 if index == 0 else 2, dropout=dropout)
            groups.append(nn.Sequential(first, *(WideBlock(width, width, 1, dropout) for _ in range(blocks - 1))))
            in_channels = width
        self.groups = nn.Sequential(*groups)
        self.head = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.groups(self.stem(images))))


def wrn16_2(channels: int, image_size: int, num_classes: int, dropout: float = 0.0) -> WideResNet:
    return WideResNet(channels, num_classes, depth=16, widen=2, dropout=dropout)


def wrn40_2(channels: int, image_size: int, num_classes: int, dropout: float = 0.0) -> WideResNet:
    return WideResNet(channels, num_classes, depth=40, widen=2, dropout=dropout)
