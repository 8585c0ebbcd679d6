"""DeepInversion's batch-norm statistics term, which deepinversion, fast_dfkd and the priors of ZSKD
and DAFL share.

A teacher with batch norm carries, in every BN layer, the running mean and variance of what that
layer received during training. A batch of images whose activations have the same per-channel mean
and variance at every BN layer looks, to the teacher, like its training data:

    sum_l (||mu_l(x) - mean_l||_2 + ||sigma^2_l(x) - var_l||_2)

where mu_l and sigma^2_l are the batch statistics of layer l's input.
"""

import torch

from dfkd.distributed import channel_moments
from dfkd.teacher import Teacher


def batch_statistics(
    teacher: Teacher, images: torch.Tensor, layers: list[str], over_ranks: bool = False
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The teacher's logits on `images`, and the per-channel mean and variance of what each of its
    batch-norm `layers` receives: over `images`, or `over_ranks`, over the batch whose shares they are."""
    with teacher.capture(layers, inputs=True) as received:
        logits = teacher(images)
    return logits, moments_of(received, over_ranks)


def moments_of(
    received: dict[str, torch.Tensor], over_ranks: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The per-channel mean and variance of what each layer received (`Teacher.capture(..., inputs=True)`)."""
    return {name: channel_moments(inputs.float(), over_ranks) for name, inputs in received.items()}


def distance_to_running(teacher: Teacher, name: str, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    layer = teacher.layers[name]
    return torch.linalg.vector_norm(mean - layer.running_mean) + torch.linalg.vector_norm(variance - layer.running_var)


def total_distance(teacher: Teacher, statistics: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The term itself: the sum over the layers of `statistics` of their distances to the running ones."""
    return sum(distance_to_running(teacher, name, *moments) for name, moments in statistics.items())


def batch_norm_loss(teacher: Teacher, images: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits on `images`, and the sum over its batch-norm `layers` of the distances
    between the batch mean and variance of each layer's input and the layer's running ones."""
    logits, statistics = batch_statistics(teacher, images, layers)
    return logits, total_distance(teacher, statistics)
