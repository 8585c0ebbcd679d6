"""DeepInversion's batch-norm term, its images and its refusals, on tiny teachers."""

import pytest
import torch
from torch import nn

from dfkd.checkpoint import CheckpointError, ResumeState
from dfkd.inputs import InputSpec
from dfkd.synthesis.deepinversion import (
    NEEDED_BY,
    DeepInversionConfig,
    InversionTransferSet,
    save_figures,
    synthesize,
)
from dfkd.synthesis.batch_norm import batch_norm_loss
from dfkd.synthesis.methods import load_transfer_set, save_transfer_set
from dfkd.teacher import Teacher, TeacherError
from dfkd.zoo import ModelConfig, build_model

SPEC = InputSpec(channels=1, size=16, mean=(0.5,), std=(0.25,), class_names=tuple("abcd"))
CPU = torch.device("cpu")


def resnet_teacher() -> Teacher:
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="resnet8", options={"width": 0.25}), 1, SPEC.size, SPEC.num_classes)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average of the batches below, not a decay from the initial 0 and 1
    with torch.no_grad():  # the running statistics of valid images that are not uniform noise
        for _ in range(3):
            model(SPEC.normalise(torch.rand(32, *SPEC.shape) ** 3))
    return Teacher(model, SPEC)


def test_the_batch_norm_term_is_zero_when_the_batch_has_the_running_statistics():
    teacher = resnet_teacher()
    images = torch.randn(64, *SPEC.shape)
    layers = teacher.batch_norm_layers(NEEDED_BY)
    assert len(layers) == 9  # the stem, two in each of the three blocks, the two projections
    for name in layers:  # in forward order: each layer's input depends on the ones before it
        with teacher.capture([name], inputs=True) as received, torch.no_grad():
            teacher(images)
        layer = teacher.layers[name]
        layer.running_mean.copy_(received[name].mean(dim=(0, 2, 3)))
        layer.running_var.copy_(received[name].var(dim=(0, 2, 3), unbiased=False))
    _, matched = batch_norm_loss(teacher, images, layers)
    _, other = batch_norm_loss(teacher, images * 3 + 1, layers)
    assert matched.item() == pytest.approx(0, abs=1e-4)
    assert other.item() > 1


def test_synthesis_lowers_the_batch_norm_term_and_balances_the_classes():
    teacher = resnet_teacher()
    config = DeepInversionConfig(images=24, batch_size=12, steps=30, lr=0.05)
    layers = teacher.batch_norm_layers(NEEDED_BY)
    torch.manual_seed(1)
    noise = SPEC.normalise(torch.rand(12, *SPEC.shape))
    with torch.no_grad():
        before = batch_norm_loss(teacher, noise, layers)[1]
    logged = []
    inversions = synthesize(teacher, config, CPU, on_step=lambda step, values: logged.append(values["loss"]))
    with torch.no_grad():
        after = batch_norm_loss(teacher, inversions.images[:12], layers)[1]
    assert inversions.images.shape == (24, *SPEC.shape) and len(logged) == 2 * config.steps
    assert after < before / 2
    assert torch.bincount(inversions.targets).tolist() == [6, 6, 6, 6]
    pixels = SPEC.pixels(inversions.images)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # valid images


def test_a_teacher_without_batch_norm_is_refused_before_any_image_is_optimised():
    lenet = build_model(ModelConfig(architecture="lenet5"), 1, 32, 10)
    spec = SPEC.model_copy(update={"size": 32, "class_names": tuple("0123456789")})
    with pytest.raises(TeacherError, match="needs a teacher with batch-norm layers.*dafl or zskd"):
        synthesize(Teacher(lenet, spec), DeepInversionConfig(images=2, batch_size=2, steps=1), CPU)


def test_the_batch_norm_layers_of_an_exported_program_are_found_and_give_the_same_term():
    teacher = resnet_teacher()
    program = torch.export.export(
        teacher.model.eval(), (torch.zeros(2, *SPEC.shape),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    exported = Teacher(torch.export.unflatten(program), SPEC)
    images = torch.randn(8, *SPEC.shape)
    layers = teacher.batch_norm_layers(NEEDED_BY)
    assert exported.batch_norm_layers(NEEDED_BY) == layers
    with torch.no_grad():
        assert torch.allclose(batch_norm_loss(exported, images, layers)[1], batch_norm_loss(teacher, images, layers)[1])


def test_the_transfer_set_round_trips_and_refuses_another_teachers_input(tmp_path):
    images, targets = torch.randn(6, *SPEC.shape), torch.arange(6) % 4
    save_transfer_set(tmp_path / "set.pt", "deepinversion", InversionTransferSet(images, targets), SPEC)
    loaded = load_transfer_set(tmp_path / "set.pt", CPU, SPEC)
    assert isinstance(loaded, InversionTransferSet)
    assert torch.equal(loaded.images, images) and torch.equal(loaded.targets, targets)
    with pytest.raises(CheckpointError, match="another input"):
        load_transfer_set(tmp_path / "set.pt", CPU, SPEC.model_copy(update={"size": 32}))


def test_a_linear_teacher_with_batch_norm_1d_is_matched_too():
    model = nn.Sequential(nn.Flatten(), nn.Linear(SPEC.size**2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    teacher = Teacher(model, SPEC)
    layers = teacher.batch_norm_layers(NEEDED_BY)
    assert layers == ["2"]
    _, term = batch_norm_loss(teacher, torch.randn(16, *SPEC.shape), layers)
    assert term.item() > 0


def test_interrupted_synthesis_resumes_after_its_last_finished_batch(tmp_path):
    config = DeepInversionConfig(images=24, batch_size=8, steps=3)

    def run(resume, kill_at=None, seen=None):
        def on_step(step, metrics):
            if seen is not None:
                seen.append(step)
            if step == kill_at:
                raise KeyboardInterrupt

        teacher = resnet_teacher()
        torch.manual_seed(0)
        return synthesize(teacher, config, CPU, on_step=on_step, resume=resume)

    unbroken = run(None)
    resume = ResumeState(tmp_path / "synthesize.pt", {"deepinversion": config.model_dump()}, every=100)
    with pytest.raises(KeyboardInterrupt):
        run(resume, kill_at=8)  # in the third batch: the first two are saved
    seen = []
    resumed = run(resume, seen=seen)
    assert seen[0] == 7
    assert torch.equal(resumed.images, unbroken.images) and torch.equal(resumed.targets, unbroken.targets)


def test_the_figure_is_a_png_file(tmp_path):
    save_figures(InversionTransferSet(torch.randn(8, *SPEC.shape), torch.arange(8) % 4), tmp_path)
    assert (tmp_path / "inversions.png").read_bytes().startswith(b"\x89PNG")
