"""Classifier checkpoints: a model of the zoo, the amalgamation's TargetNet, or a network of the user's
own design saved with `torch.export`, each stored with the `InputSpec` it takes.

A zoo (or TargetNet) checkpoint holds the architecture's name and options, the input description,
the weights and metadata; an exported one holds the `.pt2` program's bytes (a uint8 tensor) in place
of a name and weights. Both load with `torch.load(weights_only=True)`, the program then with
`torch.export.load`: no class is unpickled and no code from the file is run.
"""

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dfkd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dfkd.inputs import InputSpec
from dfkd.models import TargetNet, TargetNetConfig
from dfkd.zoo import ModelConfig, build_model

EXPORTED = "torch.export"  # the architecture name of a classifier that is an exported program
TARGETNET = "targetnet"


@dataclass(frozen=True)
class Classifier:
    model: nn.Module
    spec: InputSpec
    architecture: str  # a zoo name, TARGETNET, or EXPORTED
    options: dict = field(default_factory=dict)
    program: bytes | None = None  # the .pt2 file, for an exported classifier


def build_classifier(architecture: str, options: dict, spec: InputSpec) -> Classifier:
    """A freshly initialised classifier of `architecture` taking `spec`'s inputs."""
    if architecture == TARGETNET:
        model = TargetNet(TargetNetConfig(in_channels=spec.channels, image_size=spec.size, **options))
    else:
        config = ModelConfig(architecture=architecture, options=options)
        model = build_model(config, spec.channels, spec.size, spec.num_classes)
    return Classifier(model, spec, architecture, dict(options))


def load_program(program: bytes, source: str) -> nn.Module:
    """An exported program as a module whose submodules keep their names, so hooks reach its layers."""
    try:
        with warnings.catch_warnings():
            # torch.export's own deserialiser trips torch's deprecation of its LeafSpec: nothing the user can act on.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.export.unflatten(torch.export.load(io.BytesIO(program)))
    except Exception as error:  # torch.export raises many unrelated types for a file that is not a program
        raise CheckpointError(f"{source}: not a torch.export program ({type(error).__name__}: {error})") from error


def exported_classifier(program: bytes, spec: InputSpec, source: str) -> Classifier:
    return Classifier(load_program(program, source), spec, EXPORTED, program=program)


def load_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load `state_dict` into `model`, or say which keys are missing, unexpected or of another shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    reshaped = [
        f"{key} {tuple(state_dict[key].shape)} (expected {tuple(own[key].shape)})"
        for key in own
        if key in state_dict and isinstance(state_dict[key], torch.Tensor) and state_dict[key].shape != own[key].shape
    ]
    if missing or unexpected or reshaped:
        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        problems = [f"{label}: {listed(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", reshaped)) if keys]
        raise CheckpointError(f"{source}: the weights do not fit the architecture; " + "; ".join(problems))
    model.load_state_dict(state_dict)


def save_classifier(path: str | os.PathLike, classifier: Classifier, metadata: dict | None = None) -> None:
    payload = {"kind": "classifier", "architecture": classifier.architecture, "input": classifier.spec.model_dump(),
               "metadata": metadata or {}}
    if classifier.architecture == EXPORTED:
        payload["program"] = torch.frombuffer(bytearray(classifier.program), dtype=torch.uint8)
    else:
        payload.update(options=classifier.options, state_dict=classifier.model.state_dict())
    save_checkpoint(path, payload)


def load_classifier(path: str | os.PathLike) -> Classifier:
    path = Path(path)
    payload = load_checkpoint(path, "classifier")
    try:
        spec = InputSpec(**payload["input"])
        architecture = payload["architecture"]
        if architecture == EXPORTED:
            return exported_classifier(payload["program"].numpy().tobytes(), spec, str(path))
        classifier = build_classifier(architecture, payload["options"], spec)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a classifier checkpoint of this package ({error})") from error
    load_weights(classifier.model, payload["state_dict"], str(path))
    classifier.model.eval()
    return classifier


def load_user_classifier(path: str | os.PathLike, architecture: str, options: dict, spec: InputSpec | None) -> Classifier:
    """A classifier the user brings: a `.pt2` file of `torch.export`, a classifier checkpoint of this
    package, or a state dict of zoo `architecture` (alone, or under a "state_dict" key). `spec`
    describes the input of the files that do not carry it (all but this package's checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: the teacher checkpoint does not exist (a file, .pt2 or .pt)")
    if path.suffix == ".pt2":
        if spec is None:
            raise CheckpointError(f"{path}: a torch.export file does not say what it takes; declare teacher.input")
        return exported_classifier(path.read_bytes(), spec, str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a state dict or checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(payload, dict) and payload.get("kind") == "classifier":
        return load_classifier(path)
    state_dict = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise CheckpointError(f"{path}: not a teacher: expected a state dict (names -> tensors), found {type(payload).__name__}")
    if spec is None:
        raise CheckpointError(f"{path}: a state dict does not say what the teacher takes; declare teacher.input")
    classifier = build_classifier(architecture, options, spec)
    load_weights(classifier.model, state_dict, f"{path} ({architecture})")
    classifier.model.eval()
    return classifier


def check_classifier(classifier: Classifier, source: str) -> None:
    """Run the classifier on one batch of its input shape: it must answer (batch, classes)."""
    model = classifier.model.cpu().eval()
    batch = torch.zeros(2, *classifier.spec.shape)
    try:
        with torch.no_grad():
            output = model(batch)
    except Exception as error:  # whatever a user's network raises on an input it cannot take
        hint = " (export it with a dynamic batch dimension)" if takes_one_image(model, batch[:1]) else ""
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{source}: the classifier rejects inputs of the declared shape {tuple(batch.shape)}{hint} "
            f"({type(error).__name__}: {first_line})"
        ) from error
    if not isinstance(output, torch.Tensor) or output.shape != (2, classifier.spec.num_classes):
        found = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise CheckpointError(
            f"{source}: on a batch of 2 the classifier answers {found}, not (batch, classes) = "
            f"(2, {classifier.spec.num_classes}) for the {classifier.spec.num_classes} declared classes"
        )


def takes_one_image(model: nn.Module, image: torch.Tensor) -> bool:
    """Whether `model` runs on a batch of one: a program exported with a fixed batch of 1 does."""
    try:
        with torch.no_grad():
            model(image)
    except Exception:  # the same unknown errors as check_classifier's
        return False
    return True


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a fixed teacher (its BN layers, if any, keep their statistics)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
