"""Fast-DFKD on tiny teachers: its adversarial term, a round, the meta update, the warm-up in
synthesize and the rounds in distill, each resumed after a kill, and its refusals."""

import pytest
import torch

from dfkd.checkpoint import ResumeState
from dfkd.distill import DistillConfig, distill
from dfkd.runtime import DivergedError
from dfkd.synthesis.fast_dfkd import FastDFKDConfig, MetaGeneratorPool, adversarial_loss, save_figures, synthesize
from dfkd.synthesis.methods import load_transfer_set, save_transfer_set
from dfkd.teacher import Teacher, TeacherError
from dfkd.zoo import ModelConfig, build_model
from stages.params import ParamsError, validate_params
from test_deepinversion import SPEC, resnet_teacher

CPU = torch.device("cpu")
ROUNDS = FastDFKDConfig(latent_dim=8, generator_width=8, batch_size=12, warmup_rounds=3, inner_steps=2, student_steps=3)


class Killed(Exception):
    pass


def small_student() -> torch.nn.Module:
    torch.manual_seed(2)
    return build_model(ModelConfig(architecture="resnet8", options={"width": 0.25}), 1, SPEC.size, SPEC.num_classes)


def test_the_adversarial_term_is_minus_the_divergence_on_the_images_where_the_classes_agree():
    teacher_logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    student_logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0]])  # agrees, disagrees, agrees exactly
    p = torch.softmax(teacher_logits[0], 0)
    divergence = (p * (p.log() - torch.log_softmax(student_logits[0], 0))).sum()
    assert adversarial_loss(student_logits, teacher_logits).item() == pytest.approx(-divergence.item() / 3)


def test_a_step_down_the_adversarial_term_increases_the_disagreement():
    teacher, student = resnet_teacher(), small_student().eval()
    torch.manual_seed(3)
    images = torch.randn(16, *SPEC.shape, requires_grad=True)
    loss = adversarial_loss(student(images), teacher(images))
    (gradient,) = torch.autograd.grad(loss, images)
    with torch.no_grad():
        stepped = images - 1e-3 * gradient / gradient.abs().max()  # small: the agreeing images stay the same
        assert adversarial_loss(student(stepped), teacher(stepped)) < loss


def test_a_round_adds_its_best_batch_and_moves_the_meta_generator_leaving_the_student_untouched():
    teacher, student = resnet_teacher(), small_student()
    pool = synthesize(teacher, ROUNDS.model_copy(update={"warmup_rounds": 1}), CPU)
    assert pool.pool.shape == (12, *SPEC.shape)
    assert torch.bincount(pool.pool_targets).tolist() == [3, 3, 3, 3]
    assert set(pool.memory) == set(teacher.batch_norm_layers("test"))
    meta_before = [parameter.clone() for parameter in pool.generator.parameters()]
    for parameter in student.parameters():
        parameter.grad = torch.ones_like(parameter)
    student_before = {name: value.clone() for name, value in student.state_dict().items()}

    student.train()
    logged = pool.adversarial_step(student, teacher.model, step=1)
    assert student.training  # put back in the mode distill had it in
    assert pool.pool.shape == (24, *SPEC.shape) and logged["pool_size"] == 24
    assert logged["synthesis_adversarial"] <= 0 and logged["synthesis_batch_norm"] > 0
    assert any(not torch.equal(before, after) for before, after in zip(meta_before, pool.generator.parameters()))
    for parameter in student.parameters():
        assert torch.equal(parameter.grad, torch.ones_like(parameter))
    for name, value in student.state_dict().items():  # eval mode: not even its batch-norm statistics move
        assert torch.equal(value, student_before[name]), name


def test_the_pool_keeps_the_latest_images_up_to_its_capacity():
    pool = synthesize(resnet_teacher(), ROUNDS.model_copy(update={"pool_capacity": 30}), CPU)
    assert pool.pool.shape == (30, *SPEC.shape) and pool.pool_targets.shape == (30,)
    full = synthesize(resnet_teacher(), ROUNDS, CPU)  # the same rounds: the same seed, the same images
    assert torch.equal(pool.pool, full.pool[-30:])


def test_the_warm_up_rounds_lower_the_batch_norm_term():
    teacher = resnet_teacher()
    logged = []
    synthesize(teacher, ROUNDS.model_copy(update={"warmup_rounds": 8, "lr": 0.01}), CPU,
               on_step=lambda step, values: logged.append(values["synthesis_batch_norm"]))
    assert len(logged) == 8 and logged[-1] < logged[0]


def test_the_warm_up_resumes_after_a_kill_to_the_same_pool_and_generator(tmp_path):
    def warm_up(resume, kill_at=None):
        def on_step(step, metrics):
            if step == kill_at:
                raise Killed

        teacher = resnet_teacher()
        torch.manual_seed(5)
        return synthesize(teacher, ROUNDS, CPU, on_step=on_step, resume=resume)

    unbroken = warm_up(None)
    resume = ResumeState(tmp_path / "synthesize.pt", {"fast_dfkd": ROUNDS.model_dump()}, every=1)
    with pytest.raises(Killed):
        warm_up(resume, kill_at=2)  # round 1 is saved, round 2 is not
    resumed = warm_up(resume)
    assert torch.allclose(resumed.pool, unbroken.pool) and torch.equal(resumed.pool_targets, unbroken.pool_targets)
    for name, value in unbroken.generator.state_dict().items():
        assert torch.allclose(value, resumed.generator.state_dict()[name]), name


def test_distillation_runs_the_rounds_against_the_student_and_resumes_them(tmp_path):
    config = DistillConfig(steps=8, batch_size=8, temperature=20.0)

    def play(resume, kill_at=None, seen=None):
        teacher = resnet_teacher()
        torch.manual_seed(6)
        pool = synthesize(teacher, ROUNDS.model_copy(update={"warmup_rounds": 1}), CPU)
        student = small_student()

        def on_step(step, metrics):
            if seen is not None:
                seen.append(metrics)
            if step == kill_at:
                raise Killed

        distill(student, teacher.model, pool, config, CPU, on_step, resume)
        return student, pool

    seen = []
    unbroken_student, unbroken_pool = play(None, seen=seen)
    assert len(unbroken_pool.pool) == 4 * 12  # the warm-up round, then rounds at steps 1, 4 and 7
    assert [metrics["pool_size"] for metrics in seen] == [24, 24, 24, 36, 36, 36, 48, 48]
    resume = ResumeState(tmp_path / "distill.pt", {"steps": 8}, every=4)
    with pytest.raises(Killed):
        play(resume, kill_at=6)
    resumed_student, resumed_pool = play(resume)
    assert torch.allclose(resumed_pool.pool, unbroken_pool.pool)
    for name, value in unbroken_student.state_dict().items():
        assert torch.allclose(value, resumed_student.state_dict()[name]), name


def test_the_transfer_set_keeps_its_pool_memory_generator_and_settings(tmp_path):
    pool = synthesize(resnet_teacher(), ROUNDS, CPU)
    save_transfer_set(tmp_path / "transfer_set.pt", "fast_dfkd", pool, SPEC)
    loaded = load_transfer_set(tmp_path / "transfer_set.pt", CPU, SPEC)
    assert isinstance(loaded, MetaGeneratorPool) and loaded.config == ROUNDS and loaded.spec == SPEC
    assert torch.equal(loaded.pool, pool.pool) and torch.equal(loaded.pool_targets, pool.pool_targets)
    assert all(torch.equal(loaded.memory[name][1], pool.memory[name][1]) for name in pool.memory)
    assert torch.equal(loaded.generator.project.weight, pool.generator.project.weight)
    assert loaded.sample(5).shape == (5, *SPEC.shape)
    save_figures(loaded, tmp_path)
    assert (tmp_path / "pool.png").read_bytes().startswith(b"\x89PNG")


def test_a_teacher_without_batch_norm_is_refused_before_any_round():
    lenet = build_model(ModelConfig(architecture="lenet5"), 1, 32, 10)
    spec = SPEC.model_copy(update={"size": 32, "class_names": tuple("0123456789")})
    with pytest.raises(TeacherError, match="Fast-DFKD .* needs a teacher with batch-norm layers"):
        synthesize(Teacher(lenet, spec), ROUNDS, CPU)


def test_a_diverging_round_stops_naming_the_round_and_the_loss():
    teacher = resnet_teacher()
    teacher.layers[teacher.batch_norm_layers("test")[-1]].running_var.fill_(float("nan"))
    with pytest.raises(DivergedError, match=r"Fast-DFKD synthesis diverged at step 1: loss = nan.*batch_norm = nan"):
        synthesize(teacher, ROUNDS, CPU)


def test_a_pool_size_is_refused_because_the_pool_is_the_synthesis_own():
    with pytest.raises(ParamsError, match=r"distill: .*fast_dfkd.pool_size must be 0"):
        validate_params({"distill": {"fast_dfkd": {"pool_size": 64}}})
