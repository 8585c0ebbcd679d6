"""Fast-DFKD (Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022): a
meta-learned generator that needs only a few steps to make each new batch.

DeepInversion optimises every batch from noise for thousands of steps. Fast-DFKD notices that the
batches have much in common and learns that common part once: a generator whose weights are a
starting point from which a few steps reach a good batch. Each synthesis round
1. copies the meta generator and draws a latent batch, both of which it optimises for `inner_steps`
   Adam steps, on the batch with target classes y (balanced over the classes), jittered each step:
       oh * CE(teacher(x), y) + bn * sum_l ||blend_l(x) - running_l|| + adv * L_adv(x)
   where blend_l mixes this batch's statistics of batch-norm layer l into those of the rounds before
   (`batch_norm_momentum`: the pool as a whole, not each batch, should have the training statistics),
   and L_adv = -KL(teacher || student) on the images where the two still agree on the class
   (DFAD's game, without the images the student already gets wrong, which it cannot learn from);
2. adds the batch of the step with the lowest loss to the pool, the transfer set (the latest
   `pool_capacity` images);
3. moves the meta generator part of the way to the copy (Reptile, `meta_lr`).
The student learns in between, `student_steps` steps on pool samples for each round. So synthesis
needs the student: the synthesize stage runs the `warmup_rounds` that do not (no adversarial term)
and saves the pool and the meta generator; distill runs the rest of the rounds against the student,
as DFAD's game. The paper's 5 inner steps a round against DeepInversion's 2,000 a batch is its
speed-up.

It matches batch-norm statistics, so like DeepInversion it needs a teacher with batch norm.
"""

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from dfkd.checkpoint import ResumeState
from dfkd.distributed import average_losses, data_parallel, gather_rows, share
from dfkd.inputs import InputSpec
from dfkd.models import Generator
from dfkd.plots import save_class_grid
from dfkd.runtime import autocast, check_finite, grad_scaler, on_device
from dfkd.synthesis.dafl import GeneratorTransferSet, load_generator
from dfkd.synthesis.batch_norm import batch_statistics, total_distance
from dfkd.synthesis.zskd import jittered
from dfkd.teacher import Teacher

NEEDED_BY = "Fast-DFKD (batch-norm statistics)"


class FastDFKDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    latent_dim: int = Field(256, gt=0)  # the paper's
    generator_width: int = Field(32, ge=2)  # channels after the projection, as DAFL's
    batch_size: int = Field(256, gt=1)  # images a round adds to the pool (the paper: 256)
    warmup_rounds: int = Field(20, gt=0)  # rounds in synthesize, before the student exists (the paper: 20)
    inner_steps: int = Field(5, gt=0)  # Adam steps a round (the paper's fastest setting: 5)
    lr: float = Field(3e-3, gt=0)  # Adam, the round's copy of the generator
    latent_lr: float = Field(0.01, gt=0)  # Adam, the round's latent batch (the paper: 0.01)
    meta_lr: float = Field(0.5, gt=0, le=1)  # the share of the way the meta generator moves to the copy
    student_steps: int = Field(25, gt=0)  # student steps a round, in distill
    # The pool keeps the latest images up to this many, dropping the earliest rounds' (the worst):
    # a long run on RGB images would otherwise fill the memory (50,000: CIFAR's training set).
    pool_capacity: int = Field(50_000, gt=0)
    batch_norm_weight: float = Field(10.0, ge=0)  # the paper's CIFAR weights, as DeepInversion's
    one_hot_weight: float = Field(0.5, ge=0)
    adversarial_weight: float = Field(1.1, ge=0)
    batch_norm_momentum: float = Field(0.9, ge=0, lt=1)  # the rounds before's share of the matched statistics
    jitter: int = Field(2, ge=0)  # pixels of random shift per step
    flip: bool = False  # random mirroring: for natural images; digits are not mirror-symmetric


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Minus the KL divergence from the teacher's class distribution to the student's, on the images
    where their classes agree (zero on the others), averaged over the batch: lowering it moves the
    images towards where the student, still right, is least sure to stay so."""
    agree = (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float()
    divergence = F.kl_div(
        F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1), reduction="none", log_target=True
    ).sum(dim=1)
    return -(divergence * agree).mean()


class MetaGeneratorPool(GeneratorTransferSet):
    """The pool of the rounds' images (the transfer set: `sample` draws from it) and the meta generator
    that makes the next round's; `adversarial_step` is a round against the student, every `every`
    student steps. Its whole state resumes with the student's."""

    def __init__(self, generator: Generator, config: FastDFKDConfig, spec: InputSpec, device: torch.device):
        super().__init__(generator, device)
        self.config = config
        self.spec = spec
        self.every = config.student_steps
        self.pool = torch.empty(0, *spec.shape)  # on the CPU: it grows by a batch every round
        self.pool_targets = torch.empty(0, dtype=torch.long)
        # Per batch-norm layer, the blended (mean, variance) of the rounds so far.
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def synthesis_round(self, teacher: Teacher, student: nn.Module | None, round_: int) -> dict[str, float]:
        """One round: a batch made from the meta generator in a few steps, against the student if
        there is one, added to the pool; then the meta update. The student's gradients are left as they were."""
        config = self.config
        layers = teacher.batch_norm_layers(NEEDED_BY)
        generator = copy.deepcopy(self.generator).train()
        trained_generator = data_parallel(generator)
        # Drawn whole, then this rank's share: every rank draws the same, as one process does.
        latent = share(torch.randn(config.batch_size, config.latent_dim, device=self.device)).clone().requires_grad_()
        targets = (torch.randperm(config.batch_size) % self.spec.num_classes).to(self.device)
        adapted = [*generator.parameters(), latent]
        optimizer = torch.optim.Adam(
            [{"params": generator.parameters()}, {"params": [latent], "lr": config.latent_lr}],
            lr=config.lr, betas=(0.5, 0.999),
        )
        scaler = grad_scaler(self.device)
        best = None
        for _ in range(config.inner_steps):
            with autocast(self.device):
                images = trained_generator(latent)
                seen = jittered(images, config.jitter, config.flip)
                logits, statistics = batch_statistics(teacher, seen, layers, over_ranks=True)
                student_logits = student(seen) if student is not None else None
            blended = {
                name: tuple(config.batch_norm_momentum * before + (1 - config.batch_norm_momentum) * now
                            for before, now in zip(self.memory.get(name, moments), moments))
                for name, moments in statistics.items()
            }
            terms = {
                "one_hot": F.cross_entropy(logits.float(), share(targets)),
                "batch_norm": total_distance(teacher, blended),
                "adversarial": (adversarial_loss(student_logits.float(), logits.float()) if student is not None
                                else logits.new_zeros((), dtype=torch.float32)),
            }
            loss = (config.one_hot_weight * terms["one_hot"] + config.batch_norm_weight * terms["batch_norm"]
                    + config.adversarial_weight * terms["adversarial"])
            figures = average_losses({"loss": loss, **terms})  # the same on every rank: one step's images kept
            check_finite("Fast-DFKD synthesis", round_, **figures)
            if best is None or figures["loss"].item() < best[0]:
                best = (figures["loss"].item(), images.detach().float(),
                        {name: tuple(m.detach() for m in moments) for name, moments in blended.items()},
                        {name: value.item() for name, value in figures.items() if name != "loss"})
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward(inputs=adapted)
            scaler.step(optimizer)
            scaler.update()

        with torch.no_grad():  # Reptile: the meta generator moves towards what the round adapted it to
            for meta, fitted in zip(self.generator.parameters(), generator.parameters()):
                meta.lerp_(fitted, config.meta_lr)
            for meta, fitted in zip(self.generator.buffers(), generator.buffers()):
                meta.copy_(fitted)
        loss, images, self.memory, terms = best
        images = torch.cat(gather_rows(images))  # every rank's share, in the targets' order
        self.pool = torch.cat([self.pool, images.cpu()])[-config.pool_capacity:]
        self.pool_targets = torch.cat([self.pool_targets, targets.cpu()])[-config.pool_capacity:]
        return {"synthesis_loss": loss, **{f"synthesis_{name}": value for name, value in terms.items()},
                "pool_size": float(len(self.pool))}

    def adversarial_step(self, student: nn.Module, teacher: nn.Module, step: int) -> dict[str, float]:
        """A round against the student as it is at student step `step`, in eval mode so that the
        round's images do not move its batch-norm statistics; then back in the mode it was in."""
        training = student.training
        student.eval()
        try:
            return self.synthesis_round(Teacher(teacher, self.spec), student, step)
        finally:
            student.train(training)

    def sample(self, batch_size: int) -> torch.Tensor:
        return self.pool[torch.randint(len(self.pool), (batch_size,))]

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "pool": self.pool,
            "pool_targets": self.pool_targets,
            "memory": {name: torch.stack(moments) for name, moments in self.memory.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        pool, targets = state["pool"], state["pool_targets"]
        if not isinstance(pool, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ValueError("the pool and its targets should be tensors")
        if pool.shape[1:] != self.spec.shape or targets.shape != (len(pool),):
            raise ValueError(f"expected a pool of {self.spec.shape} images with one target each, got {tuple(pool.shape)}")
        self.generator.load_state_dict(state["generator"])
        self.pool, self.pool_targets = pool, targets
        self.memory = {name: (moments[0].to(self.device), moments[1].to(self.device))
                       for name, moments in state["memory"].items()}

    def to_checkpoint(self) -> dict:
        state = self.state_dict()
        del state["generator"]  # the superclass's state_dict
        return {**super().to_checkpoint(), "rounds": self.config.model_dump(), **state}

    @classmethod
    def from_checkpoint(cls, payload: dict, device: torch.device) -> "MetaGeneratorPool":
        spec = InputSpec.model_validate(payload["input"])
        pool = cls(load_generator(payload), FastDFKDConfig(**payload["rounds"]), spec, device)
        pool.load_state_dict({**payload, "generator": payload["state_dict"]})
        return pool


def synthesize(
    teacher: Teacher,
    config: FastDFKDConfig,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> MetaGeneratorPool:
    """The warm-up rounds against `teacher` (frozen, eval mode) alone; the pool they fill is the
    transfer set distill starts from. A killed run resumes after its last finished round."""
    teacher.batch_norm_layers(NEEDED_BY)  # refused before any work
    teacher = on_device(teacher, device)
    channels, image_size, _ = teacher.spec.shape
    generator = Generator(latent_dim=config.latent_dim, image_size=image_size, channels=channels, width=config.generator_width)
    pool = MetaGeneratorPool(generator, config, teacher.spec, device)
    start = resume.restore(config.warmup_rounds, pool=pool)["step"] if resume else 0
    for round_ in tqdm(range(start + 1, config.warmup_rounds + 1), initial=start, total=config.warmup_rounds,
                       desc="Fast-DFKD warm-up rounds"):
        metrics = pool.synthesis_round(teacher, None, round_)
        if on_step:
            on_step(round_, metrics)
        if resume:
            resume.save(round_, pool=pool)
    return pool


def save_figures(transfer_set: MetaGeneratorPool, directory: Path) -> None:
    save_class_grid(
        transfer_set.pool,
        transfer_set.pool_targets,
        transfer_set.spec.num_classes,
        directory / "pool.png",
        title="Fast-DFKD warm-up pool by target class (count per class)",
    )
