"""The CPU keeps full precision: every GPU fast path of `dfkd.runtime` is a no-op there."""

import torch
from torch import nn

from dfkd.runtime import autocast, grad_scaler, on_device

CPU = torch.device("cpu")


def test_autocast_leaves_the_cpu_in_full_precision():
    layer = nn.Linear(4, 3)
    with autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_the_grad_scaler_passes_the_loss_and_the_step_through_on_the_cpu():
    layer = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = grad_scaler(CPU)
    loss = layer(torch.ones(1, 4)).sum()
    assert not scaler.is_enabled() and scaler.scale(loss) is loss
    before = layer.weight.detach().clone()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    assert torch.allclose(layer.weight, before - 0.1 * torch.ones(1, 4))
    assert scaler.state_dict() == {}  # nothing to resume


def test_on_device_keeps_the_cpu_layout():
    conv = on_device(nn.Conv2d(3, 8, 3), CPU)
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)
