"""ZSKD: the class-similarity matrix, the Dirichlet targets, the impressions, their priors and jitter, saving and resuming."""

import math

import pytest
import torch
from torch import nn

from dfkd.checkpoint import CheckpointError, ResumeState
from dfkd.classifier import build_classifier, freeze
from dfkd.inputs import InputSpec
from dfkd.synthesis.batch_norm import batch_norm_loss
from dfkd.synthesis.methods import load_transfer_set, save_transfer_set
from dfkd.synthesis.zskd import (
    ImpressionTransferSet,
    ZSKDConfig,
    class_similarity,
    impression_loss,
    initial_pixels,
    jittered,
    optimise_images,
    sample_targets,
    save_figures,
    synthesize,
    total_variation,
)
from dfkd.teacher import Teacher, TeacherError
from dfkd.zoo.lenet import LeNet5
from test_deepinversion import resnet_teacher

CPU = torch.device("cpu")
MNIST = InputSpec(channels=1, size=32, mean=(0.1307,), std=(0.3081,), class_names=tuple("0123456789"), resize="pad")


def tiny_lenet() -> LeNet5:
    """A random LeNet-5 of a quarter width, its final layer scaled up so that, like a trained
    teacher, it is confident enough for its softmax at temperature 20 to be far from uniform."""
    torch.manual_seed(0)
    model = LeNet5(channels=1, image_size=32, num_classes=10, width=0.25).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    return model


def tiny_teacher() -> Teacher:
    return Teacher(tiny_lenet(), MNIST)


def test_class_similarity_is_the_row_normalised_cosine_of_the_class_weights():
    model = tiny_lenet()
    with torch.no_grad():  # three classes; the third lies between the first two (cosine 1/sqrt(2))
        model.classifier = nn.Linear(2, 3)
        model.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]))
    teacher = Teacher(model, MNIST.model_copy(update={"class_names": ("a", "b", "c")}))
    expected = torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [0.0, 1.0, 1 / math.sqrt(2)], [0.0, 0.0, 1.0]])
    assert torch.allclose(class_similarity(teacher), expected, atol=1e-6)


def test_class_similarity_of_a_lenet_teacher():
    similarity = class_similarity(tiny_teacher())
    assert similarity.shape == (10, 10)
    assert torch.allclose(similarity.diagonal(), torch.ones(10))  # a class is most like itself
    assert similarity.min() >= 0 and similarity.max() <= 1
    assert torch.allclose(similarity.amin(dim=1), torch.zeros(10))  # and least like one other class
    # Normalising rows keeps the cosine's symmetric ordering: i is nearer j than k on both sides.
    weights = nn.functional.normalize(tiny_lenet().classifier.weight.detach(), dim=1)
    cosine = weights @ weights.T
    assert torch.allclose(cosine, cosine.T)
    assert torch.equal(similarity.argsort(dim=1), cosine.argsort(dim=1))


def test_any_final_linear_layer_is_the_classifier_whatever_its_name():
    # No 'classifier' attribute: the last linear layer with one output per class is the one read.
    sequential = nn.Sequential(nn.Flatten(), nn.Linear(1024, 32), nn.ReLU(), nn.Linear(32, 10))
    weights = nn.functional.normalize(sequential[3].weight.detach(), dim=1)
    cosine = weights @ weights.T
    low, high = cosine.amin(dim=1, keepdim=True), cosine.amax(dim=1, keepdim=True)
    assert torch.allclose(class_similarity(Teacher(sequential, MNIST)), (cosine - low) / (high - low), atol=1e-6)


def test_a_teacher_without_a_linear_classifier_is_refused_with_the_reason():
    convolutional = tiny_lenet()
    convolutional.classifier = nn.Conv2d(10, 10, 1)
    with pytest.raises(TeacherError, match=r"ZSKD \(class similarity\) needs the teacher's final linear layer \(a weight "
                       r"of 10 rows, one per class\); found none, the last layer is 'classifier' \(Conv2d\)"):
        synthesize(Teacher(convolutional, MNIST), ZSKDConfig(impressions=4, batch_size=4, steps=1), CPU)


def test_low_dirichlet_scale_gives_sparser_targets():
    torch.manual_seed(0)
    similarity = class_similarity(tiny_teacher())
    targets, classes, scales = sample_targets(similarity, 4000, (1.0, 0.1))
    assert torch.allclose(targets.sum(dim=1), torch.ones(len(targets)), atol=1e-5)
    # Every (class, scale) pair equally often.
    pairs = torch.stack([classes, (scales * 10).round().long()], dim=1)
    assert pairs.unique(dim=0, return_counts=True)[1].tolist() == [200] * 20
    entropy = -(targets * targets.clamp_min(1e-12).log()).sum(dim=1)
    peak = targets.max(dim=1).values
    wide, sparse = scales == 1.0, scales == 0.1
    assert peak[sparse].mean() > peak[wide].mean() + 0.2
    assert entropy[sparse].mean() < entropy[wide].mean() - 0.5
    # At scale 1 the class of the row is the likeliest peak; a second normalisation that cancelled
    # the scale would make both halves the same distribution.
    assert (targets[wide].argmax(dim=1) == classes[wide]).float().mean() > 0.3


@pytest.mark.parametrize("noise", ["uniform", "normal"])
def test_impressions_move_the_teacher_towards_their_targets(noise):
    teacher = tiny_teacher()
    losses = []
    torch.manual_seed(1)
    config = ZSKDConfig(impressions=40, batch_size=20, steps=40, lr=0.1, noise=noise, jitter=0)  # unshifted: each step scores the same images
    impressions = synthesize(teacher, config, CPU, on_step=lambda step, metrics: losses.append(metrics["loss"]))
    assert len(losses) == 2 * 40
    for batch in (losses[:40], losses[40:]):  # each batch starts from fresh noise
        assert batch[-1] < 0.85 * batch[0]
    assert impressions.images.shape == (40, 1, 32, 32) and impressions.targets.shape == (40, 10)
    # The impressions are valid images: pixel intensities in [0, 1] once normalisation is undone.
    lowest, highest = MNIST.normalise(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)).flatten()
    assert impressions.images.min() >= lowest - 1e-5 and impressions.images.max() <= highest + 1e-5
    with torch.no_grad():
        final = impression_loss(teacher(impressions.images), impressions.targets, config.temperature).mean()
        noise = impression_loss(teacher(MNIST.normalise(torch.rand(40, 1, 32, 32))), impressions.targets, 20.0)
    assert final < noise.mean()


def test_total_variation_prior_gives_smoother_impressions_that_still_reach_their_targets():
    teacher = tiny_teacher()

    def impressions_with(weight):
        torch.manual_seed(2)  # the same targets and starting noise for both
        config = ZSKDConfig(impressions=40, batch_size=40, steps=60, lr=0.05, noise="normal", total_variation_weight=weight)
        return synthesize(teacher, config, CPU)

    plain, smooth = impressions_with(0.0), impressions_with(2.0)
    # Normalisation only rescales pixel differences, so the ratio is the same on the stored images.
    assert total_variation(smooth.images).mean() < 0.7 * total_variation(plain.images).mean()
    with torch.no_grad():
        start = impression_loss(teacher(MNIST.normalise(torch.rand(40, 1, 32, 32))), smooth.targets, 20.0).mean()
        reached = impression_loss(teacher(smooth.images), smooth.targets, 20.0).mean()
    assert reached < start


def test_jitter_rolls_the_whole_batch_by_one_shift_and_flip_mirrors_it():
    images = torch.arange(2 * 16.0).view(2, 1, 4, 4)
    torch.manual_seed(3)
    down, across = torch.randint(-2, 3, (2,)).tolist()
    torch.manual_seed(3)
    assert torch.equal(jittered(images, 2, flip=False), torch.roll(images, (down, across), dims=(2, 3)))
    assert torch.equal(jittered(images, 0, flip=False), images)
    mirrored = [jittered(images, 0, flip=True) for _ in range(20)]
    assert any(torch.equal(m, images.flip(dims=(3,))) for m in mirrored) and any(torch.equal(m, images) for m in mirrored)


def test_jittered_impressions_reach_their_targets_at_every_shift_and_not_at_one_alone():
    teacher = tiny_teacher()

    def loss_at_each_shift(jitter):
        torch.manual_seed(2)  # the same targets and starting noise for both
        impressions = synthesize(teacher, ZSKDConfig(impressions=40, batch_size=40, steps=60, lr=0.05, jitter=jitter), CPU)
        with torch.no_grad():
            return torch.stack([
                impression_loss(teacher(torch.roll(impressions.images, (down, across), dims=(2, 3))),
                                impressions.targets, 20.0).mean()
                for down in range(-2, 3) for across in range(-2, 3)
            ])

    aligned, shifted = loss_at_each_shift(0), loss_at_each_shift(2)
    unshifted = 12  # (0, 0) in the 5 x 5 grid of shifts
    others = torch.arange(25) != unshifted
    assert aligned[unshifted] < aligned[others].min()  # made at one alignment, they satisfy the teacher there
    assert shifted[others].mean() < aligned[others].mean()


def test_the_batch_norm_prior_brings_a_batch_norm_teachers_statistics_closer_and_changes_nothing_without_batch_norm():
    batch_norm_teacher = resnet_teacher()
    with torch.no_grad():
        batch_norm_teacher.model.classifier.weight.mul_(20)  # confident enough at temperature 20
    layers = batch_norm_teacher.batch_norm_layers("test")

    def impressions_with(teacher, weight):
        torch.manual_seed(2)  # the same targets and starting noise for both
        return synthesize(teacher, ZSKDConfig(impressions=32, batch_size=32, steps=40, lr=0.05, batch_norm_weight=weight), CPU)

    plain, matched = (impressions_with(batch_norm_teacher, weight).images for weight in (0.0, 10.0))
    with torch.no_grad():
        plain, matched = (batch_norm_loss(batch_norm_teacher, images, layers)[1] for images in (plain, matched))
    assert matched < 0.7 * plain
    lenet = tiny_teacher()
    assert torch.equal(impressions_with(lenet, 10.0).images, impressions_with(lenet, 0.0).images)


def test_impression_transfer_set_round_trips_through_a_weights_only_checkpoint(tmp_path):
    impressions = synthesize(tiny_teacher(), ZSKDConfig(impressions=12, batch_size=6, steps=2), CPU)
    save_transfer_set(tmp_path / "transfer_set.pt", "zskd", impressions, MNIST, metadata={"seed": 0})
    payload = torch.load(tmp_path / "transfer_set.pt", weights_only=True)
    assert payload["method"] == "zskd" and InputSpec(**payload["input"]) == MNIST
    loaded = load_transfer_set(tmp_path / "transfer_set.pt", CPU, MNIST)
    assert isinstance(loaded, ImpressionTransferSet)
    for name in ("images", "targets", "classes", "scales", "similarity"):
        assert torch.equal(getattr(loaded, name), getattr(impressions, name)), name
    batch = loaded.sample(32)  # drawn with replacement from the fixed impressions
    assert batch.shape == (32, 1, 32, 32)
    assert all((image == loaded.images).flatten(1).all(dim=1).any() for image in batch)
    colour = InputSpec(channels=3, size=32, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=MNIST.class_names)
    with pytest.raises(CheckpointError, match="transfer_set.pt: made for a teacher of another input"):
        load_transfer_set(tmp_path / "transfer_set.pt", CPU, colour)


def test_interrupted_synthesis_resumes_after_its_last_finished_batch(tmp_path):
    config = ZSKDConfig(impressions=30, batch_size=10, steps=3, lr=0.1)

    def run(resume, kill_at=None, seen=None):
        def on_step(step, metrics):
            if seen is not None:
                seen.append(step)
            if step == kill_at:
                raise KeyboardInterrupt

        torch.manual_seed(0)
        return synthesize(tiny_teacher(), config, CPU, on_step=on_step, resume=resume)

    unbroken = run(None)
    resume = ResumeState(tmp_path / "synthesize.pt", {"zskd": config.model_dump()}, every=100)
    with pytest.raises(KeyboardInterrupt):
        run(resume, kill_at=8)  # in the third batch: the first two are saved
    seen = []
    resumed = run(resume, seen=seen)
    assert seen[0] == 7
    assert torch.equal(resumed.images, unbroken.images) and torch.equal(resumed.targets, unbroken.targets)


def test_figures_are_png_files(tmp_path):
    save_figures(synthesize(tiny_teacher(), ZSKDConfig(impressions=20, batch_size=20, steps=1), CPU), tmp_path)
    for name in ("class_similarity.png", "impressions.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_initial_pixels_are_valid_images_of_the_teachers_input():
    torch.manual_seed(0)
    uniform = initial_pixels("uniform", 200, MNIST, CPU)
    assert uniform.shape == (200, 1, 32, 32) and uniform.min() >= 0 and uniform.max() <= 1
    assert abs(uniform.mean().item() - 0.5) < 0.01
    # `normal`: standard normal in the normalised input space, i.e. the pixel statistics of the spec;
    # a spec far from 0 and 1 keeps the clipping out of the figures.
    spec = InputSpec(channels=3, size=8, mean=(0.3, 0.5, 0.7), std=(0.05, 0.04, 0.03), class_names=("a", "b"))
    normal = initial_pixels("normal", 500, spec, CPU)
    assert normal.shape == (500, 3, 8, 8) and normal.min() >= 0 and normal.max() <= 1
    inputs = spec.normalise(normal)
    assert torch.allclose(inputs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.02)
    assert torch.allclose(inputs.std(dim=(0, 2, 3)), torch.ones(3), atol=0.02)
    clipped = initial_pixels("normal", 50, MNIST, CPU)  # MNIST's mean is 0.42 std above 0: clipped at black
    assert clipped.min() == 0 and clipped.max() <= 1


def test_optimise_images_works_a_batch_at_a_time_and_returns_normalised_images():
    spec = InputSpec(channels=3, size=8, mean=(0.2, 0.4, 0.6), std=(0.5, 0.5, 0.5), class_names=("a", "b"))
    target = torch.linspace(0, 1, 7).view(7, 1, 1, 1).expand(7, 3, 8, 8)  # image i is all target[i]
    seen_rows, steps = [], []

    def batch_loss(pixels, rows):
        seen_rows.append((rows.start, rows.stop))
        loss = (pixels - target[rows]).pow(2).mean()
        return loss, loss

    images = optimise_images(batch_loss, lambda count: torch.full((count, 3, 8, 8), 0.5), spec, count=7, batch_size=3,
                             steps=60, lr=0.05, description="test", on_step=lambda step, m: steps.append(step))
    assert sorted(set(seen_rows)) == [(0, 3), (3, 6), (6, 7)] and steps == list(range(1, 3 * 60 + 1))
    assert images.shape == (7, 3, 8, 8)
    assert torch.allclose(spec.pixels(images), target, atol=0.02)  # the pixels, normalised for the teacher
    assert spec.pixels(images).min() >= -1e-6 and spec.pixels(images).max() <= 1 + 1e-6  # kept in [0, 1]


def test_impressions_of_a_colour_teacher_without_a_feature_layer():
    torch.manual_seed(0)
    spec = InputSpec(channels=3, size=16, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), class_names=tuple("abcd"))
    teacher = Teacher(freeze(build_classifier("resnet8", {"width": 0.25}, spec).model), spec)
    similarity = class_similarity(teacher)
    assert similarity.shape == (4, 4) and torch.allclose(similarity.diagonal(), torch.ones(4))
    impressions = synthesize(teacher, ZSKDConfig(impressions=8, batch_size=8, steps=2), CPU)
    assert impressions.images.shape == (8, 3, 16, 16) and impressions.targets.shape == (8, 4)
    pixels = spec.pixels(impressions.images)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.equal(impressions.similarity, similarity)
