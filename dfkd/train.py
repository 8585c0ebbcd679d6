"""Supervised training of the teacher: the only place real training data is used."""

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from dfkd.augment import random_affine
from dfkd.checkpoint import ResumeState
from dfkd.distributed import average, data_parallel, share
from dfkd.runtime import autocast, check_finite, grad_scaler, on_device


class TeacherTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(30, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)  # peak of the one-cycle schedule
    weight_decay: float = Field(1e-4, ge=0)
    max_shift: float = Field(2.0, ge=0)  # random translation, in pixels, of each training image


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Logits for `images`, in batches, on `device`, in full precision (these are what accuracies are
    measured on); returned on the CPU."""
    model = model.to(device).eval()
    return torch.cat([model(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def train_classifier(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    config: TeacherTrainConfig,
    device: torch.device,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
    compiled: bool = False,
) -> tuple[nn.Module, dict[str, float]]:
    """Train with cross-entropy; return the weights of the epoch with the best validation accuracy
    and that epoch's metrics. Under torchrun every rank draws the same batch and trains on its share
    of it (dfkd.distributed). `compiled` trains through torch.compile; `model` is still the one to save."""
    model = on_device(model, device)
    # The whole split on the device, so that batches are gathered and augmented there.
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = grad_scaler(device)
    steps_per_epoch = -(-len(train_images) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    trained = {"model": model, "optimizer": optimizer, "schedule": schedule, "scaler": scaler}
    saved = resume.restore(config.epochs, **trained) if resume else {"step": 0}
    start = saved["step"]
    best = saved.get("best", {"val_accuracy": -1.0})
    best_state = saved.get("best_state", copy.deepcopy(model.state_dict()))

    trained_model = data_parallel(model)
    if compiled:
        trained_model = torch.compile(trained_model)
    progress = tqdm(total=config.epochs * steps_per_epoch, initial=start * steps_per_epoch, desc="teacher")
    for epoch in range(start + 1, config.epochs + 1):
        trained_model.train()
        order = torch.randperm(len(train_images))
        total_loss = 0.0
        for i in range(0, len(order), config.batch_size):
            batch = order[i : i + config.batch_size].to(device)
            images = share(random_affine(train_images[batch], config.max_shift))
            with autocast(device):
                loss = F.cross_entropy(trained_model(images), share(train_labels[batch]))
            check_finite("teacher", (epoch - 1) * steps_per_epoch + i // config.batch_size + 1, cross_entropy=loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            total_loss += loss.item() * len(batch)
            progress.update()

        metrics = {
            "train_loss": average(torch.tensor(total_loss / len(train_images))).item(),  # of each rank's shares
            "val_accuracy": accuracy(predict(model, val_images, device), val_labels),
        }
        progress.set_postfix(val_accuracy=f"{metrics['val_accuracy']:.4f}")
        if metrics["val_accuracy"] > best["val_accuracy"]:
            best = {"epoch": epoch, **metrics}
            best_state = copy.deepcopy(model.state_dict())
        if on_epoch:
            on_epoch(epoch, metrics)
        if resume:
            resume.maybe_save(epoch, extra={"best": best, "best_state": best_state}, **trained)
    progress.close()
    model.load_state_dict(best_state)
    return model.eval(), best
