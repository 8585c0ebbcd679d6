"""ZSKD: the class-similarity matrix, the Dirichlet targets, the impressions, saving and resuming."""

import math

import pytest
import torch
from torch import nn

from dfkd.checkpoint import ResumeState
from dfkd.models import ArchitectureConfig, LeNet5
from dfkd.synthesis import SynthesisError
from dfkd.synthesis.methods import load_transfer_set, save_transfer_set
from dfkd.synthesis.zskd import (
    ImpressionTransferSet,
    ZSKDConfig,
    class_similarity,
    impression_loss,
    sample_targets,
    save_figures,
    synthesize,
    to_teacher_input,
    total_variation,
)

CPU = torch.device("cpu")


def tiny_teacher() -> LeNet5:
    """A random LeNet-5 of a quarter width, its final layer scaled up so that, like a trained
    teacher, it is confident enough for its softmax at temperature 20 to be far from uniform."""
    torch.manual_seed(0)
    teacher = LeNet5(ArchitectureConfig(width=0.25)).eval()
    with torch.no_grad():
        teacher.classifier.weight.mul_(100)
    return teacher


def test_class_similarity_is_the_row_normalised_cosine_of_the_class_weights():
    teacher = tiny_teacher()
    with torch.no_grad():  # three classes; the third lies between the first two (cosine 1/sqrt(2))
        teacher.classifier = nn.Linear(2, 3)
        teacher.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]))
    expected = torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [0.0, 1.0, 1 / math.sqrt(2)], [0.0, 0.0, 1.0]])
    assert torch.allclose(class_similarity(teacher), expected, atol=1e-6)


def test_class_similarity_of_a_lenet_teacher():
    similarity = class_similarity(tiny_teacher())
    assert similarity.shape == (10, 10)
    assert torch.allclose(similarity.diagonal(), torch.ones(10))  # a class is most like itself
    assert similarity.min() >= 0 and similarity.max() <= 1
    assert torch.allclose(similarity.amin(dim=1), torch.zeros(10))  # and least like one other class
    # Normalising rows keeps the cosine's symmetric ordering: i is nearer j than k on both sides.
    weights = nn.functional.normalize(tiny_teacher().classifier.weight.detach(), dim=1)
    cosine = weights @ weights.T
    assert torch.allclose(cosine, cosine.T)
    assert torch.equal(similarity.argsort(dim=1), cosine.argsort(dim=1))


def test_a_teacher_without_a_linear_classifier_is_refused_with_the_reason():
    no_classifier = nn.Sequential(nn.Flatten(), nn.Linear(1024, 10))
    with pytest.raises(SynthesisError, match=r"ZSKD needs the teacher's final layer as an nn.Linear .*'classifier'"):
        class_similarity(no_classifier)
    convolutional = tiny_teacher()
    convolutional.classifier = nn.Conv2d(10, 10, 1)
    with pytest.raises(SynthesisError, match=r"found Conv2d\).*which classes the teacher finds alike"):
        synthesize(convolutional, ZSKDConfig(impressions=4, batch_size=4, steps=1), CPU)


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
    config = ZSKDConfig(impressions=40, batch_size=20, steps=40, lr=0.1, noise=noise)
    impressions = synthesize(teacher, config, CPU, on_step=lambda step, metrics: losses.append(metrics["loss"]))
    assert len(losses) == 2 * 40
    for batch in (losses[:40], losses[40:]):  # each batch starts from fresh noise
        assert batch[-1] < 0.85 * batch[0]
    assert impressions.images.shape == (40, 1, 32, 32) and impressions.targets.shape == (40, 10)
    # The impressions are valid images: pixel intensities in [0, 1] once normalisation is undone.
    lowest, highest = to_teacher_input(torch.tensor([0.0, 1.0]))
    assert impressions.images.min() >= lowest - 1e-5 and impressions.images.max() <= highest + 1e-5
    with torch.no_grad():
        final = impression_loss(teacher(impressions.images), impressions.targets, config.temperature).mean()
        noise = impression_loss(teacher(to_teacher_input(torch.rand(40, 1, 32, 32))), impressions.targets, 20.0)
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
        start = impression_loss(teacher(to_teacher_input(torch.rand(40, 1, 32, 32))), smooth.targets, 20.0).mean()
        reached = impression_loss(teacher(smooth.images), smooth.targets, 20.0).mean()
    assert reached < start


def test_impression_transfer_set_round_trips_through_a_weights_only_checkpoint(tmp_path):
    impressions = synthesize(tiny_teacher(), ZSKDConfig(impressions=12, batch_size=6, steps=2), CPU)
    save_transfer_set(tmp_path / "transfer_set.pt", "zskd", impressions, metadata={"seed": 0})
    assert torch.load(tmp_path / "transfer_set.pt", weights_only=True)["method"] == "zskd"
    loaded = load_transfer_set(tmp_path / "transfer_set.pt", CPU)
    assert isinstance(loaded, ImpressionTransferSet)
    for name in ("images", "targets", "classes", "scales", "similarity"):
        assert torch.equal(getattr(loaded, name), getattr(impressions, name)), name
    batch = loaded.sample(32)  # drawn with replacement from the fixed impressions
    assert batch.shape == (32, 1, 32, 32)
    assert all((image == loaded.images).flatten(1).all(dim=1).any() for image in batch)


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
