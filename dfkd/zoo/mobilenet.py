"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018),
in its CIFAR form.

The ImageNet network divides its input's side by 32; here the stem and the first downsampling stage
(24 channels) keep stride 1, so it divides by 8 and a 32x32 image ends at 4x4 (an 8x8 one at 1x1)
instead of 1x1. Everything else is the paper's: inverted residual blocks (1x1 expansion,
3x3 depthwise, linear 1x1 projection) with batch norm and ReLU6, a final 1x1 convolution to 1280
channels, global average pooling and the classifier.
"""

import torch
from torch import nn

# The paper's Table 2, (expansion t, output channels c, blocks n, first block's stride s), with the
# CIFAR stride 1 in the second row.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, relu: bool = True):
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    return nn.Sequential(*layers, nn.ReLU6()) if relu else nn.Sequential(*layers)


def scaled(channels: int, width: float) -> int:
    """`channels` times the width multiplier, to a multiple of 8 as in the paper's networks."""
    return max(8, 8 * round(channels * width / 8))


class InvertedResidual(nn.Module):
    """Expand to `expansion` times the input's channels (1x1), filter each channel (3x3 depthwise,
    with the block's stride), project back linearly (1x1, no activation); plus the input where the
    shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        expand = [conv_bn(in_channels, hidden, 1)] if expansion != 1 else []
        self.layers = nn.Sequential(
            *expand,
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_channels, 1, relu=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """`width` multiplies every layer's channels but the last convolution's 1280 (the paper keeps
    those for multipliers below one)."""

    def __init__(self, channels: int, num_classes: int, width: float):
        super().__init__()
        in_channels = scaled(STEM_CHANNELS, width)
        self.stem = conv_bn(channels, in_channels, 3)
        stages = []
        for expansion, out_channels, count, stride in STAGES:
            out_channels = scaled(out_channels, width)
            first = InvertedResidual(in_channels, out_channels, stride, expansion)
            rest = (InvertedResidual(out_channels, out_channels, 1, expansion) for _ in range(count - 1))
            stages.append(nn.Sequential(first, *rest))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        # The last stage at each resolution, before a stride-2 stage and at the end.
        strides = [stride for *_, stride in STAGES[1:]] + [2]
        self.block_layers = tuple(f"stages.{index}" for index, stride in enumerate(strides) if stride == 2)
        last = max(LAST_CHANNELS, scaled(LAST_CHANNELS, width))
        self.head = nn.Sequential(conv_bn(in_channels, last, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(last, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.stages(self.stem(images))))


def mobilenetv2(channels: int, image_size: int, num_classes: int, width: float = 1.0) -> MobileNetV2:
    return MobileNetV2(channels, num_classes, width)
