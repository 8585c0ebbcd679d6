"""ZSKD (Nayak et al., ICML 2019): data impressions, optimised from noise against the frozen teacher.

No generator and no data. The teacher's final layer says which classes it finds alike, and that is
all the method needs to model what its outputs on real data look like:
1. class similarity: the cosine similarity of the final layer's class weight vectors, each row
   min-max normalised to [0, 1] (it becomes a Dirichlet concentration, which must be positive);
2. soft targets: for class k, y ~ Dirichlet(beta * row_k), at several concentration scales beta
   (1.0 spreads y over the classes similar to k; 0.1 gives near one-hot y), in equal shares;
3. data impressions: images optimised from uniform noise, many at once, until the teacher's
   softmax at temperature T (20) matches y:   min_x  CE(y, softmax(teacher(x) / T)).
The impressions and their targets are a fixed transfer set on which the student is then distilled.

Three additions that are not in the paper, each off at 0:
- total variation, as in DeepInversion: tv * (mean |x[i+1, j] - x[i, j]| + mean |x[i, j+1] - x[i, j]|)
  favours smooth strokes over the pixel noise that satisfies the teacher just as well, and a student
  distilled on smooth impressions generalises better to real images;
- on a teacher with batch norm, DeepInversion's batch-norm statistics term (dfkd/synthesis/batch_norm.py)
  over each batch of impressions: without it, such a teacher is satisfied by textures that a
  student learns nothing from about real images. A teacher without batch norm has nothing to
  match, and its impressions are the same as at weight 0;
- DeepInversion's jitter: at every step the batch is rolled by a random shift of up to `jitter`
  pixels before the teacher sees it, so an impression has to satisfy the teacher at every alignment
  rather than at one, where pixel-level patterns would do (BENCHMARKS.md, "ZSKD on a batch-norm teacher").
"""

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from tqdm.auto import tqdm

from dfkd.checkpoint import ResumeState
from dfkd.distributed import gather_rows, rank, world_size
from dfkd.inputs import InputSpec
from dfkd.plots import save_class_grid, save_matrix
from dfkd.runtime import autocast, check_finite, grad_scaler
from dfkd.synthesis import FixedImages
from dfkd.synthesis.batch_norm import batch_norm_loss
from dfkd.teacher import Teacher

# A Dirichlet concentration must be positive; each row's least similar class would get exactly 0.
MIN_CONCENTRATION = 1e-3


class ZSKDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    impressions: int = Field(8000, gt=0)  # shared evenly by classes and scales (the paper: 24,000 for MNIST)
    batch_size: int = Field(1000, gt=0)  # impressions optimised together (the reference: 100), each on its own
    # but for the batch statistics of the batch-norm prior
    steps: int = Field(200, gt=0)  # Adam steps per batch (the reference code: 1,500)
    lr: float = Field(0.05, gt=0)  # Adam, on pixel intensities in [0, 1]
    temperature: float = Field(20.0, gt=0)  # the paper's softmax temperature for matching the targets
    scales: tuple[PositiveFloat, ...] = Field((1.0, 0.1), min_length=1)  # Dirichlet concentration scales beta
    noise: Literal["uniform", "normal"] = "normal"  # the starting images (the paper: uniform); see initial_pixels
    total_variation_weight: float = Field(0.5, ge=0)  # the smoothness prior; 0 is the paper's method
    batch_norm_weight: float = Field(10.0, ge=0)  # DeepInversion's weight; 0 is the paper's method
    jitter: int = Field(2, ge=0)  # pixels of random shift per step, as DeepInversion's; 0 is the paper's method


def class_similarity(teacher: Teacher) -> torch.Tensor:
    """(classes x classes) cosine similarity of the final layer's class weight vectors, each row
    min-max normalised: 1 on the diagonal (a class is most like itself), 0 for its least similar class."""
    # Its rows, one weight vector per class, are where ZSKD reads which classes the teacher finds alike.
    weights = F.normalize(teacher.class_weights("ZSKD (class similarity)").float(), dim=1)
    cosine = weights @ weights.T
    low, high = cosine.amin(dim=1, keepdim=True), cosine.amax(dim=1, keepdim=True)
    return (cosine - low) / (high - low).clamp_min(1e-12)


def sample_targets(similarity: torch.Tensor, count: int, scales: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """`count` soft targets: impression i is for class i mod C at scale beta_(i div C) mod S, so every
    consecutive C * S impressions cover each (class, scale) pair once. Returns (targets, classes, scales).

    The concentration is beta times the similarity row, used as it is: normalising it again (as the
    public code does) would cancel beta and make every scale give the same targets."""
    num_classes = len(similarity)
    index = torch.arange(count)
    classes = index % num_classes
    beta = torch.tensor(scales, dtype=torch.float32)[(index // num_classes) % len(scales)]
    concentration = (beta[:, None] * similarity[classes]).clamp_min(MIN_CONCENTRATION)
    return torch.distributions.Dirichlet(concentration).sample(), classes, beta


def initial_pixels(noise: str, count: int, spec: InputSpec, device: torch.device) -> torch.Tensor:
    """Starting images: `uniform` pixels in [0, 1] (the reference code), or `normal`: standard normal
    noise in the teacher's normalised input space (the pixel statistics it was trained on), clipped
    to valid pixels."""
    if noise == "uniform":
        return torch.rand(count, *spec.shape, device=device)
    return spec.pixels(torch.randn(count, *spec.shape, device=device)).clamp(0, 1)


def impression_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the teacher's softened output against the soft targets, per impression."""
    return -(targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1)


def total_variation(pixels: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, down and across, per image."""
    down = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    across = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return down + across


def jittered(images: torch.Tensor, jitter: int, flip: bool) -> torch.Tensor:
    """The batch rolled by one random shift of up to `jitter` pixels each way, mirrored half the time
    if `flip`; drawn on the CPU, so a seed gives the same shifts on every device."""
    if jitter:
        down, across = torch.randint(-jitter, jitter + 1, (2,)).tolist()
        images = torch.roll(images, shifts=(down, across), dims=(2, 3))
    if flip and torch.rand(()) < 0.5:
        images = images.flip(dims=(3,))
    return images


class ImpressionTransferSet(FixedImages):
    """The data impressions (in the teacher's normalised input space) with the soft targets they were
    optimised for, the class and scale each target was sampled at, and the class-similarity matrix."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: torch.Tensor,
        scales: torch.Tensor,
        similarity: torch.Tensor,
    ):
        super().__init__(images)
        self.targets, self.classes, self.scales, self.similarity = targets, classes, scales, similarity

    def to_checkpoint(self) -> dict:
        return {
            "images": self.images,
            "targets": self.targets,
            "classes": self.classes,
            "scales": self.scales,
            "similarity": self.similarity,
        }

    @classmethod
    def from_checkpoint(cls, payload: dict, device: torch.device) -> "ImpressionTransferSet":
        fields = ("images", "targets", "classes", "scales", "similarity")
        not_tensors = [name for name in fields if not isinstance(payload[name], torch.Tensor)]
        if not_tensors:
            raise ValueError(f"{', '.join(not_tensors)} should be tensors, got {type(payload[not_tensors[0]]).__name__}")
        images = payload["images"]
        if images.ndim != 4 or len(payload["targets"]) != len(images):
            raise ValueError(f"expected images (N, C, H, W) with N targets, got {tuple(images.shape)}")
        return cls(images, payload["targets"], payload["classes"], payload["scales"], payload["similarity"])


def optimise_images(
    batch_loss: Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]],
    start_pixels: Callable[[int], torch.Tensor],
    spec: InputSpec,
    count: int,
    batch_size: int,
    steps: int,
    lr: float,
    description: str,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> torch.Tensor:
    """`count` images optimised `batch_size` at a time, each batch from `start_pixels(n)` by `steps`
    Adam steps on pixel intensities kept in [0, 1]. `batch_loss(pixels, rows)`, where `rows` is the
    batch's slice of the `count` images, gives the loss to minimise and the figure to log. Returns
    the images in the teacher's input space; a killed run resumes after its last finished batch.

    Under torchrun the ranks take the batches in turn, each batch on a random stream seeded by its
    index, so that what a batch draws does not hang on which rank optimises it; all ranks gather
    every batch."""
    base_seed = torch.initial_seed()  # before a resume replaces the random state
    total = -(-count // batch_size) * steps
    saved = resume.restore(total) if resume else {"step": 0}
    done = saved.get("done", 0)
    images = None if done == 0 else saved["images"]
    step = saved["step"]
    progress = tqdm(total=total, initial=step, desc=description)
    for first in range(done, count, batch_size * world_size()):
        start = min(first + rank() * batch_size, count)
        rows = slice(start, min(start + batch_size, count))
        step = start // batch_size * steps
        if world_size() > 1:
            torch.manual_seed(base_seed * 1_000_003 + start // batch_size)
        pixels = start_pixels(rows.stop - rows.start).requires_grad_()
        optimizer = torch.optim.Adam([pixels], lr=lr)
        scaler = grad_scaler(pixels.device)  # a batch's steps are never cut by a resume
        for _ in range(steps if len(pixels) else 0):
            with autocast(pixels.device):
                loss, logged = batch_loss(pixels, rows)
            check_finite(description, step + 1, loss=loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                pixels.clamp_(0, 1)  # the images stay valid images
            step += 1
            progress.update()
            if on_step:
                on_step(step, {"loss": logged.item()})
        batches = gather_rows(spec.normalise(pixels.detach()).cpu())
        images = torch.cat(batches if images is None else [images, *batches])
        step = -(-len(images) // batch_size) * steps
        progress.update(step - progress.n)  # the other ranks' batches of this round
        if resume:
            resume.save(step, extra={"done": len(images), "images": images})
    progress.close()
    return images


def synthesize(
    teacher: Teacher,
    config: ZSKDConfig,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> ImpressionTransferSet:
    """Optimise `config.impressions` data impressions against `teacher` (frozen, eval mode), a batch
    of `config.batch_size` at a time; a killed run resumes after its last finished batch."""
    similarity = class_similarity(teacher).cpu()
    batch_norm_layers = teacher.batch_norm_layer_names() if config.batch_norm_weight else []
    # Channels-last convolutions take about half the time on a CPU for these small single-channel images.
    teacher = teacher.to(device, memory_format=torch.channels_last)
    spec = teacher.spec
    # Drawn before any resume: the same seed gives the same targets, so a resumed run keeps them.
    targets, classes, scales = sample_targets(similarity, config.impressions, config.scales)
    device_targets = targets.to(device)

    def start_pixels(count: int) -> torch.Tensor:
        return initial_pixels(config.noise, count, spec, device).contiguous(memory_format=torch.channels_last)

    def batch_loss(pixels: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        logits, batch_norm = batch_norm_loss(teacher, jittered(spec.normalise(pixels), config.jitter, False),
                                             batch_norm_layers)
        losses = impression_loss(logits, device_targets[rows], config.temperature)
        prior = config.total_variation_weight * total_variation(pixels)
        return (losses + prior).mean() + config.batch_norm_weight * batch_norm, losses.mean()

    images = optimise_images(batch_loss, start_pixels, spec, config.impressions, config.batch_size, config.steps,
                             config.lr, "ZSKD impressions", on_step, resume)
    return ImpressionTransferSet(images, targets, classes, scales, similarity)


def save_figures(transfer_set: ImpressionTransferSet, directory: Path) -> None:
    """The class-similarity matrix the targets came from, and the impressions of each class."""
    save_matrix(
        transfer_set.similarity.numpy(),
        directory / "class_similarity.png",
        "Teacher class similarity (final-layer cosine, rows min-max normalised)",
        axis_labels=("class", "class"),
        value_format="{:.2f}",
    )
    betas = ", ".join(f"{beta:g}" for beta in dict.fromkeys(transfer_set.scales.tolist()))
    save_class_grid(
        transfer_set.images,
        transfer_set.classes,
        len(transfer_set.similarity),
        directory / "impressions.png",
        title=f"Data impressions by target class (columns cycle through beta = {betas}; count per class)",
    )
