"""The CPU keeps full precision: every GPU fast path of `dfkd.runtime` is a no-op there; a loss that
stops being finite stops its loop."""

import pytest
import torch
from torch import nn

from dfkd.classifier import build_classifier
from dfkd.distill import DistillConfig, distill
from dfkd.inputs import InputSpec
from dfkd.runtime import DivergedError, autocast, check_finite, grad_scaler, on_device
from dfkd.synthesis import GaussianNoise
from dfkd.train import TeacherTrainConfig, train_classifier

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


def test_check_finite_names_the_step_and_every_loss_that_is_not_finite():
    check_finite("distill", 3, kd_loss=torch.tensor(0.5))
    with pytest.raises(DivergedError, match=r"generator diverged at step 7: one_hot = nan, entropy = inf;"):
        check_finite("generator", 7, one_hot=torch.tensor(float("nan")), activation=torch.tensor(1.0),
                     entropy=torch.tensor(float("inf")))


SPEC = InputSpec(channels=1, size=32, mean=(0.5,), std=(0.5,), class_names=tuple("0123456789"), resize="pad")


def test_distillation_with_a_diverging_learning_rate_stops_at_the_first_bad_step():
    teacher = build_classifier("lenet5", {}, SPEC).model.eval()
    student = build_classifier("lenet5_half", {}, SPEC).model
    config = DistillConfig(steps=50, batch_size=8, lr=1e30)
    with pytest.raises(DivergedError, match=r"distill diverged at step 2: kd_loss = nan"):
        distill(student, teacher, GaussianNoise(SPEC.shape), config, CPU)


def test_teacher_training_with_a_diverging_learning_rate_stops_at_the_first_bad_step():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 1, 32, 32), torch.arange(16) % 10
    config = TeacherTrainConfig(epochs=3, batch_size=8, lr=1e30)
    with pytest.raises(DivergedError, match=r"teacher diverged at step 2: cross_entropy = nan"):
        train_classifier(build_classifier("lenet5", {}, SPEC).model, images, labels, images, labels, config, CPU)


def distilled(compiled: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    teacher = build_classifier("lenet5", {}, SPEC).model.eval()
    student = build_classifier("lenet5_half", {}, SPEC).model
    distill(student, teacher, GaussianNoise(SPEC.shape), DistillConfig(steps=5, batch_size=16), CPU, compiled=compiled)
    return student.state_dict()


def trained(compiled: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    images, labels = torch.randn(16, 1, 32, 32), torch.arange(16) % 10
    config = TeacherTrainConfig(epochs=2, batch_size=8)
    model, _ = train_classifier(build_classifier("lenet5", {}, SPEC).model, images, labels, images, labels, config, CPU,
                                compiled=compiled)
    return model.state_dict()


@pytest.mark.parametrize("loop", [distilled, trained])
def test_a_compiled_loop_takes_the_steps_of_an_eager_one_and_returns_the_plain_model(loop):
    eager, compiled = loop(compiled=False), loop(compiled=True)
    assert compiled.keys() == eager.keys(), "the model's own names, no torch.compile wrapper's prefix"
    for name, value in eager.items():  # measured: at most 2e-6 apart (fused kernels sum in another order)
        assert torch.allclose(compiled[name], value, rtol=1e-4, atol=1e-5), name
