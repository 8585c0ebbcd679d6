"""DFKA pieces: the TargetNet, the label union, the naive combination, the losses, group-stack training."""

import copy
import math

import pytest
import torch

from dfkd.amalgamation import (
    AmalgamationError,
    ConflictConfig,
    GeneratorConfig,
    StudentConfig,
    amalgamate,
    check_teachers,
    copy_teacher_weights,
    feature_adapters,
    fit_adapters,
    generator_losses,
    naive_combination,
    offset_logits,
    synthesize,
    synthesize_conflicts,
    teacher_offsets,
)
from dfkd.checkpoint import ResumeState
from dfkd.classifier import TARGETNET, build_classifier, load_classifier, save_classifier
from dfkd.export import check_parity, export_onnx, onnx_logits, onnx_session
from dfkd.inputs import InputSpec
from dfkd.losses import information_entropy_loss
from dfkd.models import LabelUnion, TargetNet, TargetNetConfig
from dfkd.synthesis import FixedImages, GaussianNoise, Mixture
from dfkd.synthesis.dafl import dafl_losses
from dfkd.teacher import Teacher, TeacherError
from dfkd.zoo import ModelConfig, build_model
from dfkd.zoo.lenet import LeNet5

HALVES = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
CPU = torch.device("cpu")
NO_OFFSETS = [0.0, 0.0]


def mnist_spec(classes) -> InputSpec:
    """MNIST's input, for a teacher of the given digits."""
    return InputSpec(channels=1, size=32, mean=(0.1307,), std=(0.3081,), class_names=tuple(str(c) for c in classes),
                     resize="pad")


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lenet_teacher(group, width: float = 1.0) -> Teacher:
    return Teacher(LeNet5(channels=1, image_size=32, num_classes=len(group), width=width), mnist_spec(group))


def half_teachers(seed: int = 0) -> list[Teacher]:
    torch.manual_seed(seed)
    return [lenet_teacher(group) for group in HALVES]


def test_target_net_shapes_and_size():
    student = TargetNet(TargetNetConfig(groups=HALVES))
    blocks, heads, union = student.forward_all(torch.randn(4, 1, 32, 32))
    teacher_blocks = half_teachers()[0].forward_blocks(torch.randn(4, 1, 32, 32), "test")[1]
    assert [b.shape for b in blocks] == [b.shape for b in teacher_blocks]  # a LeNet-5 trunk at width 1
    assert [h.shape for h in heads] == [(4, 5), (4, 5)] and union.shape == (4, 10)
    assert student.config.num_classes == 10
    assert parameters(student) < sum(parameters(t.model) for t in half_teachers()) * 0.6
    assert parameters(TargetNet(TargetNetConfig(groups=HALVES, width=0.5))) < parameters(student) / 3


def test_combined_prediction_places_each_head_at_its_global_labels():
    student = TargetNet(TargetNetConfig(groups=((3, 0), (1, 4, 2)))).eval()
    _, (first, second), union = student.forward_all(torch.randn(6, 1, 32, 32))
    assert torch.allclose(union[:, [3, 0]], first, atol=1e-6) and torch.allclose(union[:, [1, 4, 2]], second, atol=1e-6)


def test_label_union_is_one_softmax_over_all_logits_summing_shared_labels():
    union = LabelUnion(((0, 1, 2), (2, 3)))  # class 2 is predicted by both
    a, b = torch.randn(5, 3), torch.randn(5, 2)
    probabilities = torch.softmax(torch.cat([a, b], dim=1), dim=1)
    expected = torch.stack(
        [probabilities[:, 0], probabilities[:, 1], probabilities[:, 2] + probabilities[:, 3], probabilities[:, 4]], dim=1
    )
    assert torch.allclose(torch.softmax(union([a, b]), dim=1), expected, atol=1e-6)


def test_naive_combination_lets_the_more_confident_teacher_decide():
    first = torch.tensor([[5.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 0, 0, 9.0]])
    second = torch.tensor([[0.0, 0, 2.0, 0, 0], [0, 0, 0, 8.0, 0], [3.0, 0, 0, 0, 0]])
    # Row 0: the first is surer (its class 0); row 1: the second (its local class 3 is global 8);
    # row 2: the first (its local class 4 is global 4).
    assert naive_combination([first, second], HALVES).tolist() == [0, 8, 4]
    # Confidence is the softmax probability: a teacher with larger logits decides more often.
    assert naive_combination([first * 0.1, second * 10], HALVES)[0].item() == 7


def test_generator_losses_average_the_teachers_and_balance_the_union():
    teachers = half_teachers()
    union = LabelUnion(HALVES)
    images = torch.randn(16, 1, 32, 32)
    losses = generator_losses(teachers, union, images)
    per_teacher = [dafl_losses(teacher, images)[1] for teacher in teachers]
    for name in ("one_hot", "activation", "entropy"):
        assert math.isclose(losses[name].item(), sum(t[name].item() for t in per_teacher) / 2, rel_tol=1e-5)
    combined = union([teacher(images) for teacher in teachers])
    assert math.isclose(losses["union_entropy"].item(), information_entropy_loss(combined).item(), rel_tol=1e-5)
    assert losses["union_entropy"].item() >= -math.log(10) - 1e-5


def test_the_batch_norm_term_is_averaged_over_the_teachers_with_batch_norm():
    lenet = lenet_teacher(HALVES[0])
    resnet = Teacher(build_model(ModelConfig(architecture="resnet8", options={"width": 0.25}), 1, 32, 5).eval(),
                     mnist_spec(HALVES[1]))
    layers = [[], resnet.batch_norm_layer_names()]
    images = torch.randn(16, 1, 32, 32)
    with torch.no_grad():
        losses = generator_losses([lenet, resnet], LabelUnion(HALVES), images, layers)
        alone = dafl_losses(resnet, images, layers[1])[1]["batch_norm"]
    assert torch.allclose(losses["batch_norm"], alone) and alone > 0


def test_generator_trains_against_all_teachers():
    config = GeneratorConfig(steps=3, batch_size=8, latent_dim=8, generator_width=4)
    seen = []
    transfer_set = synthesize(half_teachers(), HALVES, config, CPU, on_step=lambda step, m: seen.append(m))
    assert len(seen) == 3 and set(seen[0]) == {"loss", "one_hot", "activation", "entropy", "union_entropy"}
    assert transfer_set.sample(8).shape == (8, 1, 32, 32)


def test_a_mixture_draws_each_batch_in_the_given_shares():
    ones, zeros = FixedImages(torch.ones(3, 1, 2, 2)), FixedImages(torch.zeros(3, 1, 2, 2))
    batch = Mixture([ones, zeros], [0.75, 0.25]).sample(8)
    assert batch.shape == (8, 1, 2, 2) and batch.sum() == 6 * 4
    assert Mixture([ones, zeros], [1.0, 0.0]).sample(5).sum() == 5 * 4  # a zero share is never drawn from
    with pytest.raises(ValueError, match="one non-negative share per transfer set"):
        Mixture([ones, zeros], [0.5])


def test_teachers_of_other_input_shapes_or_output_counts_are_named():
    good = mnist_spec(range(5))
    colour = InputSpec(channels=3, size=32, mean=(0.1307,) * 3, std=(0.3081,) * 3, class_names=tuple("56789"))
    with pytest.raises(AmalgamationError, match=r"teacher 'rgb' takes 3x32x32 inputs .* but teacher 'gray' takes 1x32x32"):
        check_teachers({"gray": good, "rgb": colour}, {"gray": [0, 1, 2, 3, 4], "rgb": [5, 6, 7, 8, 9]})
    with pytest.raises(AmalgamationError, match=r"teacher 'b' has 5 outputs but is declared with 3 classes"):
        check_teachers({"a": good, "b": good}, {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7]})
    check_teachers({"a": good, "b": mnist_spec(range(5, 10))}, {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]})


def test_teachers_of_one_shape_but_another_normalisation_are_named():
    # The same 1x32x32 images, normalised otherwise: one transfer image cannot be both teachers' input.
    other = mnist_spec(range(5, 10)).model_copy(update={"mean": (0.5,), "std": (0.5,)})
    with pytest.raises(AmalgamationError, match=r"teacher 'b' takes 1x32x32 inputs normalised by mean \[0.5\], std \[0.5\] "
                       r"but teacher 'a' takes 1x32x32 by mean \[0.1307\], std \[0.3081\]: amalgamated teachers must share"):
        check_teachers({"a": mnist_spec(range(5)), "b": other}, {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]})


def test_feature_adapters_map_the_student_to_each_teacher():
    teachers = [lenet_teacher(HALVES[0]), lenet_teacher(HALVES[1], width=0.5)]
    student = TargetNet(TargetNetConfig(groups=HALVES, width=0.75))
    adapters = feature_adapters(student, teachers)
    images = torch.randn(2, 1, 32, 32)
    student_blocks = student.forward_all(images)[0]
    for b, block in enumerate(student_blocks):
        for t, teacher in enumerate(teachers):
            assert adapters[b][t](block).shape == teacher.forward_blocks(images, "test")[1][b].shape


def test_fitted_adapters_recover_a_linear_map_of_the_student_features():
    torch.manual_seed(0)
    student_maps, student_flat = torch.randn(64, 6, 5, 5), torch.randn(4000, 12)
    truth_maps, truth_flat = torch.nn.Conv2d(6, 4, kernel_size=1), torch.nn.Linear(12, 3)
    for student_block, truth, adapter in ((student_maps, truth_maps, torch.nn.Conv2d(6, 4, kernel_size=1)),
                                          (student_flat, truth_flat, torch.nn.Linear(12, 3))):
        fit_adapters(torch.nn.ModuleList([adapter]), student_block, [truth(student_block)])
        assert torch.allclose(adapter.weight, truth.weight, atol=1e-2)
        assert torch.allclose(adapter.bias, truth.bias, atol=1e-2)


TINY = StudentConfig(block_steps=2, head_steps=2, end_to_end_steps=3, batch_size=8, pool_size=0, augment_shift=1.0,
                     start_from_teachers=False)


def test_student_starts_as_the_teachers():
    teachers = half_teachers()
    student = TargetNet(TargetNetConfig(groups=HALVES))
    copy_teacher_weights(student, teachers)
    images = torch.randn(4, 1, 32, 32)
    blocks, heads, _ = student.forward_all(images)
    assert torch.allclose(heads[0], teachers[0](images))  # the first teacher's trunk and head: that teacher
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(blocks, teachers[0].forward_blocks(images, "test")[1]))
    assert torch.equal(student.heads[1][2].weight, teachers[1].model.classifier.weight)


def test_a_teacher_that_is_not_a_lenet_cannot_be_the_students_start():
    torch.manual_seed(0)
    resnet = Teacher(build_model(ModelConfig(architecture="resnet8"), 1, 32, 5), mnist_spec(range(5, 10)))
    for teachers in ([half_teachers()[0], resnet], [resnet, half_teachers()[0]]):  # as the trunk's or a head's source
        with pytest.raises(AmalgamationError, match=r"needs LeNet-5 teachers \(3 conv and 2 linear layers\); turn "
                           r"start_from_teachers off"):
            copy_teacher_weights(TargetNet(TargetNetConfig(groups=HALVES)), teachers)


def test_group_stack_needs_teachers_that_name_their_blocks():
    plain = Teacher(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 5)), mnist_spec(range(5, 10)))
    with pytest.raises(TeacherError, match="group-stack training needs the teacher's blocks"):
        feature_adapters(TargetNet(TargetNetConfig(groups=HALVES)), [half_teachers()[0], plain])


def test_group_stack_refuses_teachers_whose_blocks_do_not_match_the_targetnets():
    resnet = Teacher(build_model(ModelConfig(architecture="resnet8"), 1, 32, 5), mnist_spec(range(5, 10)))
    with pytest.raises(AmalgamationError, match=r"group-stack training needs teachers whose blocks match the TargetNet's"):
        feature_adapters(TargetNet(TargetNetConfig(groups=HALVES)), [half_teachers()[0], resnet])


def test_student_of_another_width_cannot_start_as_the_teachers():
    student = TargetNet(TargetNetConfig(groups=HALVES, width=0.5))
    with pytest.raises(AmalgamationError, match=r"\(3, 1, 5, 5\) against the teacher's \(6, 1, 5, 5\).*start_from_teachers"):
        copy_teacher_weights(student, half_teachers())


def trained_teachers() -> list[Teacher]:
    """Teachers that tell their classes apart: each fitted to a few fixed images per class."""
    torch.manual_seed(0)
    images, teachers = torch.randn(10, 1, 32, 32), half_teachers()
    for teacher, group in zip(teachers, HALVES):
        optimizer = torch.optim.Adam(teacher.model.parameters(), lr=1e-3)
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(teacher(images[list(group)]), torch.arange(5))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return [Teacher(teacher.model.eval(), teacher.spec) for teacher in teachers]


def test_conflict_images_are_claimed_by_every_teacher():
    teachers = trained_teachers()
    config = ConflictConfig(images=40, batch_size=20, steps=60, lr=0.05)
    torch.manual_seed(0)
    conflicts = synthesize_conflicts(teachers, config, CPU)
    assert conflicts.images.shape == (40, 1, 32, 32)
    with torch.no_grad():  # each teacher is sure of one of its classes: the images are claimed by both
        confidence = [torch.softmax(teacher(conflicts.images), dim=1).max(dim=1).values for teacher in teachers]
    assert all(c.mean() > 0.9 for c in confidence)


def test_interrupted_conflict_synthesis_resumes_to_the_same_images(tmp_path):
    teachers, config = half_teachers(), ConflictConfig(images=6, batch_size=2, steps=3)
    torch.manual_seed(0)
    unbroken = synthesize_conflicts(teachers, config, CPU).images

    def kill_in_second_batch(step, metrics):
        if step == 5:
            raise Killed

    resume = ResumeState(tmp_path / "conflicts.pt", {"images": 6}, every=1)
    torch.manual_seed(0)
    with pytest.raises(Killed):
        synthesize_conflicts(teachers, config, CPU, on_step=kill_in_second_batch, resume=resume)
    torch.manual_seed(0)
    resumed = synthesize_conflicts(teachers, config, CPU, resume=resume).images
    assert torch.equal(resumed[:2], unbroken[:2])  # the batch finished before the kill is kept as it was
    assert resumed.shape == unbroken.shape and torch.isfinite(resumed).all()


def test_offsets_cancel_the_arbitrary_level_of_a_teachers_logits():
    teachers, images = trained_teachers(), torch.randn(16, 1, 32, 32)
    raised = [teachers[0], Teacher(copy.deepcopy(teachers[1].model), teachers[1].spec)]
    with torch.no_grad():
        raised[1].model.classifier.bias += 3.0  # the same softmax, every logit 3 higher
        logits, raised_logits = ([teacher(images) for teacher in group] for group in (teachers, raised))
    offsets, raised_offsets = teacher_offsets(logits), teacher_offsets(raised_logits)
    assert math.isclose(raised_offsets[1] - offsets[1], 3.0, rel_tol=1e-4) and raised_offsets[0] == offsets[0]
    union = LabelUnion(HALVES)
    assert not torch.allclose(union(raised_logits), union(logits), atol=1e-3)  # raw, the raised teacher outbids
    assert torch.allclose(union(offset_logits(raised_logits, raised_offsets)), union(offset_logits(logits, offsets)), atol=1e-4)


def test_one_offset_per_teacher_is_required():
    with pytest.raises(AmalgamationError, match="1 logit offsets for 2 teachers"):
        amalgamate(TargetNet(TargetNetConfig(groups=HALVES)), half_teachers(), GaussianNoise((1, 32, 32)), [0.0], TINY, CPU)


def test_group_stack_trains_one_block_at_a_time_then_the_heads():
    torch.manual_seed(0)
    student = TargetNet(TargetNetConfig(groups=HALVES))
    snapshots = {}
    initial = {name: value.clone() for name, value in student.state_dict().items()}

    def on_step(step, metrics):
        snapshots[step] = {name: value.clone() for name, value in student.state_dict().items()}

    amalgamate(student, half_teachers(), GaussianNoise((1, 32, 32)), NO_OFFSETS, TINY, CPU, group_stack=True, on_step=on_step)
    changed = lambda step, prefix: any(  # noqa: E731
        not torch.equal(snapshots[step][name], (snapshots[step - 2] if step > 2 else initial)[name])
        for name in initial if name.startswith(prefix)
    )
    assert changed(2, "blocks.0") and not changed(2, "blocks.1") and not changed(2, "heads")
    assert changed(4, "blocks.1") and not changed(4, "blocks.0") and not changed(4, "blocks.2")
    assert changed(8, "heads") and not changed(8, "blocks")  # steps 7-8: the heads phase
    assert len(snapshots) == 3 * 2 + 2 + 3 and all(p.requires_grad for p in student.parameters())


def test_ablation_trains_everything_for_the_same_number_of_steps():
    seen = []
    amalgamate(TargetNet(TargetNetConfig(groups=HALVES)), half_teachers(), GaussianNoise((1, 32, 32)), NO_OFFSETS, TINY, CPU,
               group_stack=False, on_step=lambda step, m: seen.append(step))
    assert seen == list(range(1, 12))


class Killed(Exception):
    pass


def run_group_stack(resume: ResumeState | None, kill_at: int | None = None) -> TargetNet:
    torch.manual_seed(0)
    student = TargetNet(TargetNetConfig(groups=HALVES))

    def on_step(step, metrics):
        if step == kill_at:
            raise Killed

    return amalgamate(student, half_teachers(), GaussianNoise((1, 32, 32)), NO_OFFSETS, TINY, CPU, on_step=on_step, resume=resume)


def test_interrupted_group_stack_resumes_to_the_same_student(tmp_path):
    unbroken = run_group_stack(None)
    resume = ResumeState(tmp_path / "gs.pt", {"steps": 11}, every=4)
    with pytest.raises(Killed):
        run_group_stack(resume, kill_at=10)  # in the end-to-end phase, last saved in the heads phase (8)
    resumed = run_group_stack(resume)
    for name, value in unbroken.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name]), name


def test_target_net_checkpoint_and_onnx_give_the_combined_prediction(tmp_path):
    torch.manual_seed(0)
    spec = mnist_spec(range(5))
    classifier = build_classifier(TARGETNET, {"groups": [[0, 1, 2], [2, 3, 4]], "width": 1.0}, spec)
    student = classifier.model.eval()
    assert isinstance(student, TargetNet) and student.config.groups == ((0, 1, 2), (2, 3, 4))
    save_classifier(tmp_path / "student.pt", classifier)
    restored = load_classifier(tmp_path / "student.pt")
    images = torch.randn(300, 1, 32, 32)
    assert restored.architecture == TARGETNET and restored.spec == spec
    assert isinstance(restored.model, TargetNet) and torch.equal(restored.model(images), student(images))
    export_onnx(restored.model, spec, tmp_path / "student.onnx", opset=18)
    report = check_parity(restored.model, tmp_path / "student.onnx", images[:256], max_abs_diff=1e-4)
    assert report["argmax_mismatches"] == 0
    assert onnx_logits(onnx_session(tmp_path / "student.onnx"), images[:7]).shape == (7, 5)
