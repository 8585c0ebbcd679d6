"""DFAD's game on tiny models: the generator's step is an ascent of the disagreement, distillation
plays the game and resumes it, and its settings travel with the transfer set."""

import pytest
import torch

from dfkd.checkpoint import ResumeState
from dfkd.distill import DistillConfig, distill
from dfkd.inputs import InputSpec
from dfkd.losses import logit_disagreement
from dfkd.synthesis import FixedImages
from dfkd.synthesis.dfad import AdversarialGenerator, DFADConfig, synthesize
from dfkd.synthesis.methods import load_transfer_set, save_transfer_set
from dfkd.teacher import Teacher
from dfkd.zoo.lenet import LeNet5
from stages.params import DistillParams, ParamsError, validate_params

SPEC = InputSpec(channels=1, size=32, mean=(0.5,), std=(0.5,), class_names=tuple("0123456789"), resize="pad")
CPU = torch.device("cpu")
GAME = DFADConfig(latent_dim=16, generator_width=8, lr=0.01, student_steps=3, batch_size=16)


class Killed(Exception):
    pass


def teacher_and_student() -> tuple[LeNet5, LeNet5]:
    torch.manual_seed(0)
    teacher = LeNet5(channels=1, image_size=32, num_classes=10, width=1.0).eval().requires_grad_(False)
    return teacher, LeNet5(channels=1, image_size=32, num_classes=10, width=0.5)


def test_the_generator_step_increases_the_disagreement_and_leaves_the_student_as_it_was():
    teacher, student = teacher_and_student()
    adversary = synthesize(Teacher(teacher, SPEC), GAME, CPU)
    student_before = {name: value.clone() for name, value in student.state_dict().items()}

    def disagreement_on(latent):
        with torch.no_grad():
            images = adversary.generate(latent)
            return logit_disagreement(student(images), teacher(images)).item()

    torch.manual_seed(1)
    latent = torch.randn(GAME.batch_size, GAME.latent_dim)  # the batch the step will draw
    before = disagreement_on(latent)
    torch.manual_seed(1)
    logged = adversary.adversarial_step(student.eval(), teacher, step=1)
    assert logged["generator_disagreement"] == pytest.approx(before, rel=1e-5)
    assert disagreement_on(latent) > before
    for name, value in student.state_dict().items():
        assert torch.equal(value, student_before[name]), name


def test_the_student_minimises_the_disagreement_the_generator_maximises():
    recipe = DistillParams().config("dfad")
    assert recipe.loss == "l1"
    teacher, student = teacher_and_student()
    torch.manual_seed(2)
    images = torch.randn(32, *SPEC.shape)
    seen = []
    config = recipe.model_copy(update={"steps": 30, "batch_size": 32})
    distill(student, teacher, FixedImages(images), config, CPU, on_step=lambda step, metrics: seen.append(metrics["kd_loss"]))
    with torch.no_grad():
        after = logit_disagreement(student(images), teacher(images)).item()
    # The first step's loss is the disagreement of the untrained student on these images.
    assert after < 0.5 * seen[0]


def play(resume: ResumeState | None, kill_at: int | None = None, seen: list | None = None):
    teacher, student = teacher_and_student()
    adversary = synthesize(Teacher(teacher, SPEC), GAME, CPU)

    def on_step(step, metrics):
        if seen is not None:
            seen.append(metrics)
        if step == kill_at:
            raise Killed

    distill(student, teacher, adversary, DistillConfig(steps=10, batch_size=8), CPU, on_step, resume)
    return student, adversary


def test_distillation_plays_the_game_and_resumes_it_to_the_same_student_and_generator(tmp_path):
    untouched = synthesize(Teacher(teacher_and_student()[0], SPEC), GAME, CPU)
    seen = []
    unbroken_student, unbroken_generator = play(resume=None, seen=seen)
    assert all("generator_disagreement" in metrics for metrics in seen)
    assert not torch.equal(untouched.generator.project.weight, unbroken_generator.generator.project.weight)

    resume = ResumeState(tmp_path / "distill.pt", {"steps": 10}, every=4)
    with pytest.raises(Killed):
        play(resume, kill_at=6)
    resumed_student, resumed_generator = play(resume)
    for unbroken, resumed in ((unbroken_student, resumed_student), (unbroken_generator.generator, resumed_generator.generator)):
        for name, value in unbroken.state_dict().items():
            assert torch.allclose(value, resumed.state_dict()[name]), name


def test_a_pool_is_refused_because_it_would_stop_the_game():
    teacher, student = teacher_and_student()
    with pytest.raises(ValueError, match="pool_size must be 0"):
        distill(student, teacher, synthesize(Teacher(teacher, SPEC), GAME, CPU), DistillConfig(pool_size=64), CPU)
    with pytest.raises(ParamsError, match=r"distill: .*dfad.pool_size must be 0"):
        validate_params({"distill": {"dfad": {"pool_size": 64}}})


def test_the_transfer_set_keeps_the_generator_and_the_settings_of_its_game(tmp_path):
    adversary = synthesize(Teacher(teacher_and_student()[0], SPEC), GAME, CPU)
    save_transfer_set(tmp_path / "transfer_set.pt", "dfad", adversary, SPEC)
    loaded = load_transfer_set(tmp_path / "transfer_set.pt", CPU, SPEC)
    assert isinstance(loaded, AdversarialGenerator) and loaded.config == GAME
    assert torch.equal(loaded.generator.project.weight, adversary.generator.project.weight)
    assert loaded.sample(4).shape == (4, *SPEC.shape)
