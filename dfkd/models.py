"""The networks of the methods (the classifiers are in dfkd/zoo/): DAFL's generator, and the
multi-branch TargetNet of data-free amalgamation (DFKA) with its label union.

A TargetNet is rebuilt from a plain `TargetNetConfig` dict stored next to its weights, so a
checkpoint loads with `torch.load(..., weights_only=True)` and no pickled classes.
"""

from dataclasses import asdict, dataclass
from itertools import chain

import torch
from torch import nn


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
        # Channels-last convolutions draw a batch of 256 about 3x faster on a CPU (BENCHMARKS.md).
        return self.upsample(self.project_norm(x.contiguous(memory_format=torch.channels_last)))


class LabelUnion(nn.Module):
    """Logits over the union of several classifiers' labels: one softmax over all their logits side by
    side, a label predicted by several of them getting the sum of their probabilities (the log-sum-exp
    of their logits). `groups[i]` lists the global label of each output of classifier i."""

    def __init__(self, groups: tuple[tuple[int, ...], ...]):
        super().__init__()
        labels = list(chain(*groups))
        self.num_classes = max(labels) + 1
        # -1e9 rather than -inf: exp() gives exactly 0 either way, and no inf ever reaches ONNX.
        owners = torch.full((self.num_classes, len(labels)), -1e9)
        for column, label in enumerate(labels):
            owners[label, column] = 0.0
        self.register_buffer("owners", owners, persistent=False)

    def forward(self, logits: list[torch.Tensor]) -> torch.Tensor:
        side_by_side = torch.cat(logits, dim=1)  # (N, sum of the groups' sizes)
        return torch.logsumexp(side_by_side.unsqueeze(1) + self.owners, dim=2)  # (N, num_classes)


@dataclass(frozen=True)
class TargetNetConfig:
    """Everything needed to rebuild a TargetNet: the classes of each branch and the trunk's width."""

    groups: tuple[tuple[int, ...], ...]  # global label of each output of each branch (one per teacher)
    in_channels: int = 1
    image_size: int = 32
    width: float = 1.0  # of the LeNet-5 layers: 1.0 gives a LeNet-5 trunk (6, 16, 120) and 84-unit heads

    def __post_init__(self):  # lists from a checkpoint or a config file -> hashable tuples
        object.__setattr__(self, "groups", tuple(tuple(int(label) for label in group) for group in self.groups))

    @property
    def num_classes(self) -> int:
        return max(chain(*self.groups)) + 1

    def to_dict(self) -> dict:
        return asdict(self)


class TargetNet(nn.Module):
    """DFKA's student: a shared LeNet-5 trunk of three conv blocks, one head per teacher over that
    teacher's classes, and the combined prediction over the union of their labels.

    `forward` gives the combined logits (what the ONNX file computes); `forward_all` also gives
    every block's output and every head's logits, which group-stack training matches to the teachers.
    """

    def __init__(self, config: TargetNetConfig):
        super().__init__()
        if config.image_size != 32:
            raise ValueError(f"TargetNet takes 32x32 inputs, got image_size={config.image_size}")
        self.config = config
        c1, c2, c3, f1 = (max(1, round(n * config.width)) for n in (6, 16, 120, 84))
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(config.in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2)),
                nn.Sequential(nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2)),
                nn.Sequential(nn.Conv2d(c2, c3, 5), nn.ReLU(), nn.Flatten()),
            ]
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c3, f1), nn.ReLU(), nn.Linear(f1, len(group))) for group in config.groups
        )
        self.union = LabelUnion(config.groups)

    def forward_all(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(block outputs, each head's logits, combined logits over the union of labels)."""
        blocks, x = [], images
        for block in self.blocks:
            x = block(x)
            blocks.append(x)
        head_logits = [head(x) for head in self.heads]
        return blocks, head_logits, self.union(head_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_all(images)[2]
