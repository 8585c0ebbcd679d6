"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

ResNet-18 and ResNet-34 are the pair DAFL, ZSKT, DeepInversion and Fast-DFKD compare on CIFAR
(ResNet-34 teacher, ResNet-18 student): a 3x3 stride-1 stem without max-pooling, so that 32x32
inputs keep their resolution, then four stages of BasicBlocks at 64-128-256-512 channels. ResNet-8
is the small CIFAR ResNet (three stages of one block at 16-32-64 channels) that trains on a CPU in
minutes. Global average pooling makes every one of them take any image size.
"""

import torch
from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut; a 1x1 projection (with batch norm) where
    the block changes the resolution or the width, the identity elsewhere (the paper's option B)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, then one stage per entry of `widths` (`blocks[i]` BasicBlocks; every stage after the
    first halves the resolution), global average pooling and the classifier."""

    def __init__(self, channels: int, num_classes: int, widths: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, in_channels = [], widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            first = BasicBlock(in_channels, width, stride)
            stages.append(nn.Sequential(first, *(BasicBlock(width, width, 1) for _ in range(count - 1))))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.block_layers = tuple(f"stages.{index}" for index in range(len(stages)))  # each stage's output
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.stages(self.stem(images))))


def resnet8(channels: int, image_size: int, num_classes: int, width: float = 1.0) -> ResNet:
    """`width` scales the 16-32-64 channels of the three stages."""
    widths = tuple(max(1, round(n * width)) for n in (16, 32, 64))
    return ResNet(channels, num_classes, widths, blocks=(1, 1, 1))


def resnet18(channels: int, image_size: int, num_classes: int) -> ResNet:
    return ResNet(channels, num_classes, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))


def resnet34(channels: int, image_size: int, num_classes: int) -> ResNet:
    return ResNet(channels, num_classes, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3))
