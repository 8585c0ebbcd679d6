import pytest
import torch
from torch import nn

from dfkd.export import check_parity, export_onnx
from dfkd.inputs import InputSpec
from dfkd.zoo import ARCHITECTURES, ModelConfig, build_model

CLASSES = 10
# LeNet-5 takes 32x32 only; every other architecture ends in global average pooling.
SIZES = {name: (32,) if name.startswith("lenet5") else (32, 16, 8) for name in ARCHITECTURES}
BUILDS = [(name, channels, size) for name in ARCHITECTURES for channels in (1, 3) for size in SIZES[name]]


def build(name: str, channels: int, size: int) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(architecture=name), channels, image_size=size, num_classes=CLASSES)


def small_size(name: str) -> int:
    return min(SIZES[name])


@pytest.mark.parametrize("name, channels, size", BUILDS)
def test_forward_gives_one_logit_per_class(name, channels, size):
    model = build(name, channels, size).eval()
    with torch.no_grad():
        assert model(torch.randn(3, channels, size, size)).shape == (3, CLASSES)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_classifier_is_the_last_linear_and_named_layers_exist(name):
    model = build(name, 3, 32)
    linears = [module for _, module in model.named_modules() if isinstance(module, nn.Linear)]
    assert linears[-1].out_features == CLASSES
    modules = dict(model.named_modules())
    for layer in (getattr(model, "feature_layer", None), *getattr(model, "block_layers", ())):
        assert layer is None or layer in modules, layer


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_train_then_eval_mode(name):
    size = small_size(name)
    model = build(name, 3, size)
    images = torch.randn(4, 3, size, size)
    model.train()
    logits = model(images)
    logits.sum().backward()
    assert logits.shape == (4, CLASSES) and torch.isfinite(logits).all()
    model.eval()
    with torch.no_grad():
        first, second = model(images[:1]), model(images)[:1]
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-5)  # eval: batch statistics play no part


@pytest.mark.parametrize("name, channels", [(name, channels) for name in ARCHITECTURES for channels in (1, 3)])
def test_onnx_export_has_parity(name, channels, tmp_path):
    size = small_size(name) if name.startswith("lenet5") else 16
    model = build(name, channels, size).eval()
    spec = InputSpec(
        channels=channels,
        size=size,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        class_names=tuple(str(k) for k in range(CLASSES)),
    )
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, spec, path, opset=18)
    report = check_parity(model, path, torch.randn(4, channels, size, size), max_abs_diff=1e-4)
    assert report["samples"] == 4 and report["argmax_mismatches"] == 0


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"resnet8 has no option depth \(its options: width \(default 1.0\)\)"):
        ModelConfig(architecture="resnet8", options={"depth": 20})
    with pytest.raises(ValueError, match=r"resnet18 has no option width \(its options: none\)"):
        ModelConfig(architecture="resnet18", options={"width": 2.0})


def test_unknown_architecture_lists_the_zoo():
    with pytest.raises(ValueError, match="unknown architecture 'resnet50'") as error:
        ModelConfig(architecture="resnet50")
    assert all(name in str(error.value) for name in ARCHITECTURES)


def test_options_change_the_model():
    def parameters(name: str, **options) -> int:
        config = ModelConfig(architecture=name, options=options)
        return sum(p.numel() for p in build_model(config, channels=3, image_size=32, num_classes=CLASSES).parameters())

    assert parameters("resnet8", width=2.0) > parameters("resnet8")
    assert parameters("mobilenetv2", width=0.5) < parameters("mobilenetv2")
    dropped = build_model(ModelConfig(architecture="wrn16_2", options={"dropout": 0.3}), 3, 32, CLASSES)
    assert {module.p for module in dropped.modules() if isinstance(module, nn.Dropout)} == {0.3}
