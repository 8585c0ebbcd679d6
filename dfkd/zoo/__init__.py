"""The model zoo: an architecture name and its options -> an `nn.Module`, for teachers and students.

Every builder takes the input's `channels`, `image_size` and `num_classes` (any of each, where the
architecture allows) and keyword options of its own. A checkpoint stores the name and the options
(`ModelConfig`) beside the weights, so a model is rebuilt without unpickling any class. A new
architecture is one file and one entry in `ARCHITECTURES`.

Layers that methods reach through hooks (dfkd/teacher.py) are found, not named by convention: the
final `nn.Linear` with one output per class is the classifier. A builder's module may name others
with class attributes: `feature_layer`, the layer whose output DAFL's activation loss reads (default:
the classifier's input), and `block_layers`, the outputs a TargetNet reproduces block by block.
"""

import inspect
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from dfkd.teacher import is_batch_norm
from dfkd.zoo import lenet, mobilenet, resnet, wrn

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet.lenet5,
    "lenet5_half": lenet.lenet5_half,
    "resnet8": resnet.resnet8,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "wrn16_2": wrn.wrn16_2,
    "wrn40_2": wrn.wrn40_2,
    "mobilenetv2": mobilenet.mobilenetv2,
}
INPUT_ARGUMENTS = ("channels", "image_size", "num_classes")


class ZooError(ValueError):
    """An architecture name or option the zoo does not have; the message lists what it has."""


class ModelConfig(BaseModel):
    """An architecture of the zoo and its options, e.g. {"architecture": "lenet5", "options": {"width": 0.5}}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str = Field(min_length=1)
    options: dict[str, int | float | bool | str] = {}

    @model_validator(mode="after")
    def check_known(self):
        check_model_config(self)  # a ZooError is a ValueError: pydantic reports it under the config's key
        return self


def architecture_options(name: str) -> dict[str, object]:
    """The options of architecture `name` with their defaults."""
    if name not in ARCHITECTURES:
        raise ZooError(f"unknown architecture '{name}' (the zoo has: {', '.join(ARCHITECTURES)})")
    parameters = inspect.signature(ARCHITECTURES[name]).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in INPUT_ARGUMENTS}


def check_model_config(config: ModelConfig) -> None:
    """Refuse an unknown architecture or option before any model is built."""
    known = architecture_options(config.architecture)
    unknown = sorted(set(config.options) - set(known))
    if unknown:
        listed = ", ".join(f"{name} (default {value!r})" for name, value in known.items()) or "none"
        raise ZooError(f"{config.architecture} has no option {', '.join(unknown)} (its options: {listed})")


def has_batch_norm(config: ModelConfig) -> bool:
    """Whether the architecture normalises by running statistics; built on the meta device, where
    weights have shapes but no memory, so even ResNet-34 costs a fraction of a second."""
    with torch.device("meta"):
        model = build_model(config, channels=1, image_size=32, num_classes=10)
    return any(is_batch_norm(module) for module in model.modules())


def build_model(config: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    return ARCHITECTURES[config.architecture](
        channels=channels, image_size=image_size, num_classes=num_classes, **config.options
    )
