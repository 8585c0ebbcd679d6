import math

import pytest
import torch

from dfkd.losses import activation_loss, information_entropy_loss, kd_loss, logit_disagreement, one_hot_loss


def test_entropy_loss_is_minimal_at_the_uniform_class_distribution():
    # A batch covering each of 10 classes once: batch-mean distribution is uniform.
    balanced = torch.eye(10) * 50
    collapsed = torch.zeros(10, 10)
    collapsed[:, 3] = 50
    assert math.isclose(information_entropy_loss(balanced).item(), -math.log(10), rel_tol=1e-4)
    assert information_entropy_loss(collapsed).item() > -1e-3  # one class: entropy 0
    for _ in range(20):
        random_logits = torch.randn(10, 10) * 3
        assert information_entropy_loss(random_logits).item() >= information_entropy_loss(balanced).item() - 1e-6


def test_entropy_loss_gradient_vanishes_at_the_uniform_distribution():
    logits = torch.zeros(8, 10, requires_grad=True)
    information_entropy_loss(logits).backward()
    assert logits.grad.abs().max().item() < 1e-7


def test_one_hot_loss_rewards_confident_outputs():
    confident = torch.tensor([[20.0, 0.0, 0.0], [0.0, 0.0, 20.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.1]])
    assert one_hot_loss(confident).item() < 1e-6
    assert one_hot_loss(unsure).item() > one_hot_loss(confident).item() + 0.5


def test_activation_loss_is_minus_mean_absolute_feature():
    features = torch.tensor([[1.0, -3.0], [2.0, 0.0]])
    assert activation_loss(features).item() == -1.5


def test_kd_loss_is_zero_when_student_matches_teacher_and_positive_otherwise():
    teacher = torch.randn(16, 10)
    assert abs(kd_loss(teacher.clone(), teacher, temperature=4.0).item()) < 1e-6
    assert kd_loss(torch.randn(16, 10), teacher, temperature=4.0).item() > 0


def test_kd_loss_gradient_matches_hintons_high_temperature_limit():
    # With the T^2 factor, the gradient tends to (centred z_s - centred z_t) / classes as T grows,
    # so the loss's scale does not depend on the temperature (Hinton et al., 2015).
    teacher = torch.randn(8, 10)
    student = torch.randn(8, 10).requires_grad_()
    kd_loss(student, teacher, temperature=100.0).backward()
    centred = lambda z: z - z.mean(dim=1, keepdim=True)  # noqa: E731
    limit = (centred(student.detach()) - centred(teacher)) / 10 / len(teacher)  # batchmean
    assert torch.allclose(student.grad, limit, rtol=0.05, atol=5e-4)


def test_logit_disagreement_is_the_mean_absolute_difference_of_the_logits():
    teacher = torch.randn(16, 10)
    assert logit_disagreement(teacher.clone(), teacher).item() == 0
    assert logit_disagreement(teacher + 0.5, teacher).item() == pytest.approx(0.5)
    # Logits shifted together keep their softmax, so KD sees no difference; DFAD's game does.
    assert kd_loss(teacher + 3.0, teacher, temperature=1.0).item() == pytest.approx(0, abs=1e-5)
    assert logit_disagreement(teacher + 3.0, teacher).item() == pytest.approx(3.0)
