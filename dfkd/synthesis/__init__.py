"""Synthesis methods: each file here turns a fixed teacher into a transfer set, without real data.

The interface is small: a method trains or optimises something from the teacher and returns a
`TransferSet`, whose `sample(batch_size)` gives images in the teacher's normalised input space.
Distillation only ever sees a `TransferSet`, so a new method is one new file. A method whose
synthesis needs the student (DFAD, Fast-DFKD) returns one that also has `adversarial_step(student,
teacher, step)`, which distillation calls every `every` student steps.
"""

from typing import Protocol

import torch


class TransferSet(Protocol):
    def sample(self, batch_size: int) -> torch.Tensor: ...


class GaussianNoise:
    """The floor baseline: standard normal noise in the normalised input space."""

    def __init__(self, image_shape: tuple[int, ...]):
        self.image_shape = image_shape

    def sample(self, batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, *self.image_shape)


class FixedImages:
    """A fixed set of images drawn with replacement: the real train split (the ceiling baseline),
    or a pool drawn once from another transfer set."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def sample(self, batch_size: int) -> torch.Tensor:
        return self.images[torch.randint(len(self.images), (batch_size,))]


class Mixture:
    """Each batch drawn from several transfer sets, a fixed share of it from each."""

    def __init__(self, transfer_sets: list[TransferSet], shares: list[float]):
        if len(transfer_sets) != len(shares) or min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"need one non-negative share per transfer set, not all zero; got {shares}")
        self.transfer_sets = transfer_sets
        self.shares = [share / sum(shares) for share in shares]

    def sample(self, batch_size: int) -> torch.Tensor:
        bounds = [0] + [round(batch_size * sum(self.shares[: i + 1])) for i in range(len(self.shares))]
        parts = [source.sample(end - start) for source, start, end in zip(self.transfer_sets, bounds, bounds[1:]) if end > start]
        return torch.cat([part.to(parts[0].device) for part in parts])
