"""Losses of data-free distillation. Natural logarithms throughout (the DAFL code's log10 only rescales
the entropy weight, and silently so)."""

import torch
import torch.nn.functional as F

from dfkd.distributed import batch_mean


def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL L_oh: cross-entropy of the teacher's output against its own argmax (confident samples)."""
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1))


def activation_loss(teacher_features: torch.Tensor) -> torch.Tensor:
    """DAFL L_a: minus the L1 norm of the teacher's features (real images activate strongly).

    Averaged over feature elements as well as samples: the published weight (0.1) assumes that scale.
    """
    return -teacher_features.abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """DAFL L_ie: minus the entropy of the batch-mean class distribution (balanced classes).

    Minimal (-log k) when the batch covers every class equally, zero when one class takes all. With
    several processes, the batch is all of theirs.
    """
    mean_probabilities = batch_mean(F.softmax(teacher_logits, dim=1))
    return (mean_probabilities * torch.log(mean_probabilities.clamp_min(1e-12))).sum()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD: KL(teacher || student) between softened distributions, scaled by T^2 so the
    gradient size does not depend on the temperature."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    teacher_probs = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(student_log_probs, teacher_probs, reduction="batchmean") * temperature**2


def logit_disagreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DFAD's mean absolute difference of the logits: unlike a KL divergence, its gradient does not
    vanish as the two come to agree, and it sees logits that differ where their softmaxes do not."""
    return (student_logits - teacher_logits).abs().mean()
