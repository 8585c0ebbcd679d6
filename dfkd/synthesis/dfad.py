"""DFAD (Fang et al., 2019), the adversarial game of ZSKT (Micaelli & Storkey, NeurIPS 2019): a
generator that seeks out the images on which the student still disagrees with the teacher.

The student is inside the synthesis. While it distils on the generator's samples, before every
`student_steps` of its steps the generator takes one Adam step up the teacher-student disagreement on
fresh samples, DFAD's mean absolute difference of logits, which the student's steps minimise in turn
(`distill.dfad.loss: l1`). So this method's synthesis makes only the generator's seeded
starting point and its settings; the game is played by `dfkd.distill.distill`, to which an
`AdversarialGenerator` is a transfer set that learns against the student.
"""

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dfkd.checkpoint import ResumeState
from dfkd.distributed import average_losses, data_parallel, share
from dfkd.losses import logit_disagreement
from dfkd.models import Generator
from dfkd.runtime import autocast, check_finite, grad_scaler
from dfkd.synthesis.dafl import GeneratorTransferSet, load_generator
from dfkd.teacher import Teacher


class DFADConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    latent_dim: int = Field(100, gt=0)
    generator_width: int = Field(32, ge=2)  # channels after the projection, as DAFL's
    lr: float = Field(1e-3, gt=0)  # the generator's Adam (the reference: 1e-3)
    student_steps: int = Field(5, gt=0)  # student steps per generator step (the reference: 5)
    batch_size: int = Field(256, gt=1)  # the generator's batch (more than one: its batch norm)


class AdversarialGenerator(GeneratorTransferSet):
    """Fresh generator samples for every batch, like DAFL's; `adversarial_step` moves the generator
    towards the images the student gets wrong. Its state (weights and optimiser) resumes with the
    student's."""

    def __init__(self, generator: Generator, config: DFADConfig, device: torch.device):
        super().__init__(generator, device)
        self.config = config
        self.every = config.student_steps
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.lr)
        self.scaler = grad_scaler(device)
        self.trained_generator = data_parallel(self.generator)

    def adversarial_step(self, student: nn.Module, teacher: nn.Module, step: int) -> dict[str, float]:
        """One generator step against the student as it is at student step `step`; the student's
        gradients it leaves behind are cleared by the student's own next step."""
        latent = share(torch.randn(self.config.batch_size, self.generator.latent_dim, device=self.device))
        self.generator.train()
        with autocast(self.device):
            images = self.trained_generator(latent)
            gap = logit_disagreement(student(images), teacher(images))
        figures = average_losses({"disagreement": gap})
        check_finite("adversarial generator", step, **figures)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(-gap).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"generator_disagreement": figures["disagreement"].item()}

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def to_checkpoint(self) -> dict:
        return {**super().to_checkpoint(), "game": self.config.model_dump()}

    @classmethod
    def from_checkpoint(cls, payload: dict, device: torch.device) -> "AdversarialGenerator":
        return cls(load_generator(payload), DFADConfig(**payload["game"]), device)


def synthesize(
    teacher: Teacher,
    config: DFADConfig,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> AdversarialGenerator:
    """The generator's seeded starting point, for images of `teacher`'s input: nothing is trained
    before the student exists, so there is no step to log or resume."""
    channels, image_size, _ = teacher.spec.shape
    generator = Generator(latent_dim=config.latent_dim, image_size=image_size, channels=channels, width=config.generator_width)
    return AdversarialGenerator(generator, config, device)
