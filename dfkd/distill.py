"""Knowledge distillation of a student from a teacher on any transfer set.

The student only ever sees what `TransferSet.sample` gives (generator images, data impressions,
noise or real images) and the teacher's outputs on it: no labels.
"""

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from dfkd.augment import random_affine
from dfkd.checkpoint import ResumeState
from dfkd.distributed import average, data_parallel, share
from dfkd.losses import kd_loss, logit_disagreement
from dfkd.runtime import autocast, check_finite, grad_scaler, on_device
from dfkd.synthesis import FixedImages, TransferSet


class DistillSchedule(BaseModel):
    """The student's optimisation: the same whatever the transfer set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(256, gt=0)
    lr: float = Field(5e-3, gt=0)  # Adam, decayed to zero on a cosine (the DAFL MNIST recipe: 2e-3)


class TransferRecipe(BaseModel):
    """How long and how the student sees the transfer set: what suits one synthesis method's images
    and not another's (a generator's endless fresh samples, or a few thousand fixed impressions)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(2000, gt=0)  # student steps: how long the set keeps teaching differs by method
    # kl: Hinton's KD at `temperature`; l1: the mean absolute difference of the logits, which DFAD's
    # generator maximises: the student must minimise the same disagreement, or the game is not one.
    loss: Literal["kl", "l1"] = "kl"
    temperature: float = Field(1.0, gt=0)  # of the kl loss: DAFL distils at T=1; ZSKD at T=20
    # Random translation (pixels), rotation (degrees each way) and scaling (factor in [1 - s, 1 + s])
    # of each transfer image; teacher and student see the same transformed image, so the teacher
    # relabels it: more variety from a fixed transfer set, no real data.
    augment_shift: float = Field(0.0, ge=0)
    augment_rotation: float = Field(0.0, ge=0, le=180)
    augment_scale: float = Field(0.0, ge=0, lt=1)
    # Images drawn once from the transfer set and reused; 0 draws fresh images every step as the
    # DAFL reference does. On a CPU a generator's forward pass costs several student steps.
    pool_size: int = Field(0, ge=0)


class DistillConfig(DistillSchedule, TransferRecipe):
    """Everything `distill` needs."""


def draw_pool(transfer_set: TransferSet, size: int, batch_size: int) -> FixedImages:
    # Full batches only: a generator's batch norm in training mode needs more than a few samples.
    batches = [transfer_set.sample(batch_size) for _ in tqdm(range(-(-size // batch_size)), desc="transfer pool")]
    return FixedImages(torch.cat(batches)[:size])


def distill(
    student: nn.Module,
    teacher: nn.Module,
    transfer_set: TransferSet,
    config: DistillConfig,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
    compiled: bool = False,
) -> nn.Module:
    """Train `student` to match `teacher`'s softened outputs on transfer-set samples; return it. An
    adversarial transfer set takes its step against the student every `transfer_set.every` steps.

    The student of the last step is the result: picking a checkpoint would need held-out real data,
    which a data-free pipeline does not have. Under torchrun every rank draws the same batch and
    trains on its share of it (dfkd.distributed). `compiled` runs the student's steps and the
    teacher's answers through torch.compile.
    """
    teacher = on_device(teacher, device).eval()
    student = on_device(student, device)
    # A transfer set that learns against the student (dfad, fast_dfkd) takes its step here.
    adversarial = hasattr(transfer_set, "adversarial_step")
    if config.pool_size and adversarial:
        raise ValueError("pool_size must be 0 for an adversarial transfer set: a pool would stop its game")
    if config.pool_size:
        transfer_set = draw_pool(transfer_set, config.pool_size, config.batch_size)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    scaler = grad_scaler(device)
    trained = {"student": student, "optimizer": optimizer, "schedule": schedule, "scaler": scaler}
    if adversarial:
        trained["transfer_set"] = transfer_set
    saved = resume.restore(config.steps, **trained) if resume else {"step": 0}
    start, game = saved["step"], saved.get("game", {})  # game: the generator's figures of its last step

    student.train()
    trained_student = data_parallel(student)
    answering_teacher = teacher
    if compiled:
        trained_student, answering_teacher = torch.compile(trained_student), torch.compile(teacher)
    for step in tqdm(range(start + 1, config.steps + 1), initial=start, total=config.steps, desc="distill"):
        if adversarial and (step - 1) % transfer_set.every == 0:
            game = transfer_set.adversarial_step(student, teacher, step)
        images = share(random_affine(
            transfer_set.sample(config.batch_size).to(device),
            config.augment_shift, config.augment_rotation, config.augment_scale,
        ))
        with autocast(device):
            with torch.no_grad():
                teacher_logits = answering_teacher(images)
            student_logits = trained_student(images)
            if config.loss == "l1":
                loss = logit_disagreement(student_logits, teacher_logits)
            else:
                loss = kd_loss(student_logits, teacher_logits, config.temperature)
        check_finite("distill", step, kd_loss=loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()

        agreement = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean()
        kd, agreement = average(torch.stack([loss.detach().float(), agreement])).tolist()
        if on_step:
            on_step(step, {"kd_loss": kd, "teacher_agreement": agreement, **game})
        if resume:
            resume.maybe_save(step, extra={"game": game}, **trained)
    return student.eval()
