"""Device choice and seeding, shared by every training loop."""

import random

import numpy as np
import torch


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
