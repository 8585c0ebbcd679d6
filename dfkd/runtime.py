"""Device choice, seeding and the GPU's fast paths, shared by every training loop.

On CUDA the loops compute in mixed precision (bf16 where the GPU has it, else fp16 with loss
scaling) on channels-last models; on the CPU every one of these is a no-op, so the CPU computes in
fp32 exactly as the figures of BENCHMARKS.md were measured.
"""

import contextlib
import random
from typing import TypeVar

import numpy as np
import torch

Movable = TypeVar("Movable")  # an nn.Module, or anything with its `.to(device, memory_format=...)`


def resolve_device(device: str) -> torch.device:
    """`auto` takes the GPU when one is present and the CPU otherwise; the code is the same on both."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' was asked for but no CUDA GPU is available")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward passes and losses on CUDA; nothing on the CPU."""
    return torch.autocast("cuda", dtype=amp_dtype()) if device.type == "cuda" else contextlib.nullcontext()


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling, which fp16 needs and bf16 does not; disabled, it passes the loss and the
    optimizer step through unchanged and its state is empty."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp_dtype() == torch.float16)


def on_device(module: Movable, device: torch.device) -> Movable:
    """`module` (or a `Teacher`) moved to `device`; on CUDA also to channels-last weights, the layout
    its convolution kernels are fastest in."""
    if device.type == "cuda":
        return module.to(device, memory_format=torch.channels_last)
    return module.to(device)


class DivergedError(RuntimeError):
    """A loss that stopped being finite: the run cannot recover from it, so it stops before
    anything it trained is written."""


def check_finite(loop: str, step: int, **losses: torch.Tensor) -> None:
    """Stop `loop` at the first step with a NaN or infinite loss, naming the step and the loss,
    before the optimiser step that would carry it into the weights."""
    diverged = [f"{name} = {value.item()}" for name, value in losses.items() if not torch.isfinite(value).all()]
    if diverged:
        raise DivergedError(
            f"{loop} diverged at step {step}: {', '.join(diverged)}; stopped before writing anything "
            "(a lower learning rate is the usual cure)"
        )
