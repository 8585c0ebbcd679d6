"""DAFL's batch-norm term: from the same teacher pass as its three terms, on teachers with batch
norm only, and lowered by the generator's training."""

import torch

from dfkd.synthesis.batch_norm import batch_norm_loss
from dfkd.synthesis.dafl import DAFLConfig, dafl_losses, layers_to_match, synthesize, weighted_total
from dfkd.teacher import Teacher
from dfkd.zoo import ModelConfig, build_model

from test_deepinversion import CPU, SPEC, resnet_teacher


def test_the_batch_norm_term_comes_from_the_same_teacher_pass_as_dafls_terms():
    teacher = resnet_teacher()
    layers = layers_to_match(teacher, DAFLConfig())
    assert layers == teacher.batch_norm_layer_names() and layers
    images = torch.randn(16, *SPEC.shape)
    passes = []
    handle = teacher.model.register_forward_hook(lambda *_: passes.append(1))
    with torch.no_grad():
        logits, losses = dafl_losses(teacher, images, layers)
    handle.remove()
    assert len(passes) == 1
    with torch.no_grad():
        _, without = dafl_losses(teacher, images)
        _, term = batch_norm_loss(teacher, images, layers)
    assert list(losses) == ["one_hot", "activation", "entropy", "batch_norm"] and list(without) == list(losses)[:3]
    assert torch.allclose(losses["batch_norm"], term)
    assert all(torch.allclose(losses[name], without[name]) for name in without)
    config = DAFLConfig(batch_norm_weight=3.0)
    assert torch.allclose(weighted_total(losses, config), weighted_total(without, config) + 3 * term)


def test_a_teacher_without_batch_norm_or_a_zero_weight_leaves_dafl_as_published():
    lenet = Teacher(build_model(ModelConfig(architecture="lenet5"), 1, 32, 10).eval(), SPEC.model_copy(
        update={"size": 32, "class_names": tuple("0123456789")}))
    assert layers_to_match(lenet, DAFLConfig()) == []
    assert layers_to_match(resnet_teacher(), DAFLConfig(batch_norm_weight=0)) == []
    logged = []
    config = DAFLConfig(steps=2, batch_size=8, latent_dim=8, generator_width=4)
    synthesize(lenet, config, CPU, on_step=lambda step, values: logged.append(values))
    assert [list(values) for values in logged] == [["loss", "one_hot", "activation", "entropy"]] * 2


def test_the_generator_lowers_the_batch_norm_term():
    teacher = resnet_teacher()
    layers = teacher.batch_norm_layer_names()
    terms = {}
    for weight in (0.0, 10.0):
        config = DAFLConfig(steps=40, batch_size=32, latent_dim=16, generator_width=8, lr=0.05, batch_norm_weight=weight)
        torch.manual_seed(0)
        transfer_set = synthesize(teacher, config, CPU)
        with torch.no_grad():
            terms[weight] = batch_norm_loss(teacher, transfer_set.sample(256), layers)[1].item()
    assert terms[10.0] < terms[0.0] / 2, terms
