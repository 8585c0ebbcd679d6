"""DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020): images optimised from noise until the
frozen teacher's batch-norm layers see the statistics of its training data.

A teacher with batch norm carries, in every BN layer, the running mean and variance of what that
layer received during training. A batch of images whose activations have the same per-channel mean
and variance at every BN layer looks, to the teacher, like its training data (dfkd/synthesis/batch_norm.py).
Each batch of images, each with a target class, minimises

    CE(teacher(x), y) + bn * sum_l (||mu_l(x) - mean_l||_2 + ||sigma^2_l(x) - var_l||_2)
                      + tv * TV(x) + l2 * ||x||^2

where mu_l and sigma^2_l are the batch statistics of layer l's input. At every step the batch is
randomly shifted (jitter, rolled by up to `jitter` pixels) and, if `flip`, mirrored, so the images
do not overfit one pixel alignment of the teacher. The images and their classes are a fixed
transfer set, like ZSKD's impressions. The paper's "adaptive" variant, which adds a teacher-student
disagreement term, needs the student inside synthesis and is not this file.

A teacher without batch norm (the default LeNet-5) has nothing to match: it is refused with an
error saying so (dfkd/teacher.py), before any image is optimised.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from dfkd.checkpoint import ResumeState
from dfkd.plots import save_class_grid
from dfkd.synthesis import FixedImages
from dfkd.synthesis.batch_norm import batch_norm_loss
from dfkd.synthesis.zskd import initial_pixels, jittered, optimise_images, total_variation
from dfkd.teacher import Teacher

NEEDED_BY = "DeepInversion (batch-norm statistics)"


class DeepInversionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    images: int = Field(4000, gt=0)  # balanced over the classes
    batch_size: int = Field(256, gt=1)  # optimised together: their statistics are what is matched
    steps: int = Field(200, gt=0)  # Adam steps per batch (the paper: 2,000)
    lr: float = Field(0.05, gt=0)  # Adam, on pixel intensities in [0, 1]
    batch_norm_weight: float = Field(10.0, ge=0)  # the paper's CIFAR setting, as Fast-Datafree uses it
    total_variation_weight: float = Field(0.5, ge=0)  # the smoothness prior (ZSKD's, here L1 on pixels)
    l2_weight: float = Field(0.0, ge=0)  # on the normalised images
    jitter: int = Field(2, ge=0)  # pixels of random shift per step
    flip: bool = False  # random horizontal mirroring: right for natural images, wrong for digits
    noise: Literal["uniform", "normal"] = "normal"  # the starting images (dfkd/synthesis/zskd.py)


class InversionTransferSet(FixedImages):
    """The inverted images (in the teacher's normalised input space) with the class each was made for."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        super().__init__(images)
        self.targets = targets

    def to_checkpoint(self) -> dict:
        return {"images": self.images, "targets": self.targets}

    @classmethod
    def from_checkpoint(cls, payload: dict, device: torch.device) -> "InversionTransferSet":
        images, targets = payload["images"], payload["targets"]
        if not isinstance(images, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ValueError("images and targets should be tensors")
        if images.ndim != 4 or targets.shape != (len(images),):
            raise ValueError(f"expected images (N, C, H, W) with N targets, got {tuple(images.shape)}")
        return cls(images, targets)


def synthesize(
    teacher: Teacher,
    config: DeepInversionConfig,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> InversionTransferSet:
    """Invert `config.images` images from `teacher` (frozen, eval mode: its running statistics are
    the targets), `config.batch_size` at a time; a killed run resumes after its last finished batch."""
    layers = teacher.batch_norm_layers(NEEDED_BY)
    teacher = teacher.to(device)
    spec = teacher.spec
    # Drawn before any resume: the same seed gives the same classes, so a resumed run keeps them.
    targets = torch.randperm(config.images) % spec.num_classes
    device_targets = targets.to(device)

    def start_pixels(count: int) -> torch.Tensor:
        return initial_pixels(config.noise, count, spec, device)

    def batch_loss(pixels: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        images = spec.normalise(pixels)
        logits, statistics = batch_norm_loss(teacher, jittered(images, config.jitter, config.flip), layers)
        loss = (
            F.cross_entropy(logits.float(), device_targets[rows])
            + config.batch_norm_weight * statistics
            + config.total_variation_weight * total_variation(pixels).mean()
            + config.l2_weight * images.pow(2).mean()
        )
        return loss, loss

    images = optimise_images(batch_loss, start_pixels, spec, config.images, config.batch_size, config.steps,
                             config.lr, "DeepInversion", on_step, resume)
    return InversionTransferSet(images, targets)


def save_figures(transfer_set: InversionTransferSet, directory: Path) -> None:
    save_class_grid(
        transfer_set.images,
        transfer_set.targets,
        int(transfer_set.targets.max()) + 1,
        directory / "inversions.png",
        title="DeepInversion images by target class (count per class)",
    )
