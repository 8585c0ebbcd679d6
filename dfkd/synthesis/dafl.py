"""DAFL (Chen et al., ICCV 2019): a generator trained against the frozen teacher alone.

The teacher stands in for a GAN discriminator that cannot be trained without data. The generator
is pushed towards images the teacher classifies confidently (one-hot loss), that excite its
features (activation loss) and that cover every class evenly over a batch (information entropy):
    L_G = oh * L_oh + a * L_a + ie * L_ie
On a teacher with batch norm we add DeepInversion's batch-norm term (dfkd/synthesis/batch_norm.py),
as for ZSKD: without it, the generator settles on images that such a teacher is confident of but that
excite it nothing like its training data did (BENCHMARKS.md).
"""

from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from dfkd.checkpoint import ResumeState
from dfkd.distributed import average_losses, data_parallel, share
from dfkd.losses import activation_loss, information_entropy_loss, one_hot_loss
from dfkd.models import Generator
from dfkd.plots import save_class_grid
from dfkd.runtime import autocast, check_finite, grad_scaler, on_device
from dfkd.synthesis.batch_norm import moments_of, total_distance
from dfkd.teacher import Teacher


class DAFLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(1000, gt=0)  # the reference: 200 x 120 iterations
    batch_size: int = Field(128, gt=1)  # the entropy term needs a batch to balance classes over
    latent_dim: int = Field(100, gt=0)
    generator_width: int = Field(32, ge=2)  # channels after the projection (the reference: 128)
    lr: float = Field(0.02, gt=0)  # Adam (the reference MNIST rate: 0.2)
    one_hot_weight: float = Field(1.0, ge=0)
    activation_weight: float = Field(0.1, ge=0)
    entropy_weight: float = Field(5.0, ge=0)
    batch_norm_weight: float = Field(1.0, ge=0)  # not in the paper; 0 turns it off


def load_generator(payload: dict) -> Generator:
    """The generator saved by `GeneratorTransferSet.to_checkpoint` (or a subclass's)."""
    generator = Generator(**payload["architecture"])
    generator.load_state_dict(payload["state_dict"])
    return generator


class GeneratorTransferSet:
    """Fresh generator samples for every batch."""

    def __init__(self, generator: Generator, device: torch.device):
        self.generator = generator.to(device)
        self.device = device

    def to_checkpoint(self) -> dict:
        generator = self.generator
        return {
            "architecture": {
                "latent_dim": generator.latent_dim,
                "image_size": generator.base_size * 4,
                "channels": generator.channels,
                "width": generator.width,
            },
            "state_dict": generator.state_dict(),
        }

    @classmethod
    def from_checkpoint(cls, payload: dict, device: torch.device) -> "GeneratorTransferSet":
        return cls(load_generator(payload), device)

    @torch.no_grad()
    def generate(self, latent: torch.Tensor) -> torch.Tensor:
        # Batch statistics, as during the generator's training: its final affine-free batch norm is
        # what puts samples at the scale of normalised real inputs.
        self.generator.train()
        return self.generator(latent.to(self.device))

    def sample(self, batch_size: int) -> torch.Tensor:
        return self.generate(torch.randn(batch_size, self.generator.latent_dim, device=self.device))


def save_figures(transfer_set: GeneratorTransferSet, directory: Path, rows: int = 10, steps: int = 8) -> None:
    """Walks through the generator's latent space, each row from one random latent vector to another:
    smooth rows show a generator that learnt a continuous space of images, not a few it repeats."""
    start, end = torch.randn(2, rows, 1, transfer_set.generator.latent_dim)
    weights = torch.linspace(0, 1, steps).view(1, steps, 1)
    images = transfer_set.generate(((1 - weights) * start + weights * end).flatten(0, 1))
    save_class_grid(
        images.cpu(), torch.arange(rows).repeat_interleave(steps), rows, directory / "latent_walks.png", per_class=steps,
        title="Generator latent walks: each row blends two random latent vectors",
    )


def dafl_losses(
    teacher: Teacher, images: torch.Tensor, matched_layers: list[str] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher's logits on `images` and DAFL's three loss terms (unweighted), with the batch-norm
    term over the batch-norm `matched_layers` where they name any: all from one forward pass."""
    with teacher.capture(matched_layers or [], inputs=True) as received:
        logits, features = teacher.forward_with_features(images)
    losses = {
        "one_hot": one_hot_loss(logits),
        "activation": activation_loss(features),
        "entropy": information_entropy_loss(logits),
    }
    if matched_layers:
        # Over the whole batch when several processes hold shares of it, as the entropy term is.
        losses["batch_norm"] = total_distance(teacher, moments_of(received, over_ranks=True))
    return logits, losses


def layers_to_match(teacher: Teacher, config: DAFLConfig) -> list[str]:
    """The layers whose statistics the generator is to match: none without batch norm or weight."""
    return teacher.batch_norm_layer_names() if config.batch_norm_weight else []


def weighted_total(losses: dict[str, torch.Tensor], config: DAFLConfig) -> torch.Tensor:
    total = (
        config.one_hot_weight * losses["one_hot"]
        + config.activation_weight * losses["activation"]
        + config.entropy_weight * losses["entropy"]
    )
    if "batch_norm" in losses:
        total = total + config.batch_norm_weight * losses["batch_norm"]
    return total


def train_generator(
    generator_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    image_shape: tuple[int, int, int],
    config: DAFLConfig,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> GeneratorTransferSet:
    """Train a generator of `image_shape` images (channels, size, size) to minimise
    `generator_loss(images)`, which returns the total and its terms (for the curves)."""
    channels, image_size, _ = image_shape
    generator = on_device(
        Generator(latent_dim=config.latent_dim, image_size=image_size, channels=channels, width=config.generator_width),
        device,
    )
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.lr)
    scaler = grad_scaler(device)
    trained = {"generator": generator, "optimizer": optimizer, "scaler": scaler}
    start = resume.restore(config.steps, **trained)["step"] if resume else 0

    generator.train()
    trained_generator = data_parallel(generator)
    for step in tqdm(range(start + 1, config.steps + 1), initial=start, total=config.steps, desc="generator"):
        latent = share(torch.randn(config.batch_size, config.latent_dim, device=device))
        with autocast(device):
            total, losses = generator_loss(trained_generator(latent))
        figures = average_losses({"loss": total, **losses})
        check_finite("generator", step, **figures)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()

        if on_step:
            on_step(step, {name: value.item() for name, value in figures.items()})
        if resume:
            resume.maybe_save(step, **trained)
    return GeneratorTransferSet(generator, device)


def synthesize(
    teacher: Teacher,
    config: DAFLConfig,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> GeneratorTransferSet:
    """Train DAFL's generator against `teacher` (frozen, eval mode); its samples are the transfer set."""
    teacher = on_device(teacher, device)
    layers = layers_to_match(teacher, config)

    def generator_loss(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, losses = dafl_losses(teacher, images, layers)
        return weighted_total(losses, config), losses

    return train_generator(generator_loss, teacher.spec.shape, config, device, on_step, resume)
