"""A killed training loop resumes from its last saved state and ends where an unbroken run ends."""

import pytest
import torch

from dfkd.checkpoint import ResumeState
from dfkd.distill import DistillConfig, distill
from dfkd.synthesis import GaussianNoise
from dfkd.zoo.lenet import LeNet5


class Killed(Exception):
    pass


def run_distill(resume: ResumeState | None, kill_at: int | None = None, seen: list | None = None) -> LeNet5:
    torch.manual_seed(0)
    teacher = LeNet5(channels=1, image_size=32, num_classes=10, width=1.0).eval()
    student = LeNet5(channels=1, image_size=32, num_classes=10, width=0.5)

    def on_step(step, metrics):
        if seen is not None:
            seen.append(step)
        if step == kill_at:
            raise Killed

    config = DistillConfig(steps=12, batch_size=16, augment_shift=1.0)
    return distill(student, teacher, GaussianNoise((1, 32, 32)), config, torch.device("cpu"), on_step, resume)


def test_interrupted_distillation_resumes_to_the_same_student(tmp_path):
    unbroken = run_distill(resume=None)
    resume = ResumeState(tmp_path / "distill.pt", {"steps": 12}, every=5)
    with pytest.raises(Killed):
        run_distill(resume, kill_at=8)
    seen = []
    resumed = run_distill(resume, seen=seen)
    assert seen[0] == 6, "continues after the last saved step (5)"
    for name, value in unbroken.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name]), name


def test_resume_state_of_other_settings_is_ignored(tmp_path):
    ResumeState(tmp_path / "s.pt", {"steps": 12}, every=1).maybe_save(1, extra={"note": "x"})
    assert ResumeState(tmp_path / "s.pt", {"steps": 12}, every=1).load()["note"] == "x"
    assert ResumeState(tmp_path / "s.pt", {"steps": 99}, every=1).restore(total=12) == {"step": 0}
    assert not (tmp_path / "s.pt").exists(), "the stale state is discarded"
