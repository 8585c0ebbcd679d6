"""How the methods reach into a teacher: forward hooks on named layers, so any classifier works.

DAFL reads the features before the classifier, ZSKD the final linear layer's class weight vectors,
DeepInversion what each batch-norm layer receives, group-stack amalgamation the output of each block.
None of them calls an attribute of a particular network: the layers are found by name in
`named_modules()` (a zoo model may name them with `feature_layer` and `block_layers`, dfkd/zoo/), or
by what they are (the classifier is the last linear layer with one output per class, in a
`torch.export` program the last submodule that applies `aten.linear` with such a weight; a batch-norm
layer is one that holds running statistics, in a program too).
"""

from contextlib import contextmanager

import torch
from torch import nn

from dfkd.inputs import InputSpec


class TeacherError(ValueError):
    """A teacher that a method cannot use; the message says what the method needs and what was found."""


def is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    graph = getattr(module, "graph", None)  # a submodule of an unflattened torch.export program
    return graph is not None and any(node.target is torch.ops.aten.linear.default for node in graph.nodes)


def is_batch_norm(module: nn.Module) -> bool:
    """Normalises by running statistics: nn.BatchNorm*, or the same layer in an unflattened program."""
    buffers = dict(module.named_buffers(recurse=False))
    return "running_mean" in buffers and "running_var" in buffers


class Teacher:
    """A frozen classifier, its input description and hooks on the layers the methods read."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        self.model = model.eval()
        self.spec = spec
        self.layers = dict(model.named_modules())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def to(self, device: torch.device, **kwargs) -> "Teacher":
        self.model.to(device, **kwargs)
        return self

    def classifier_name(self, needed_by: str) -> str:
        """The name of the final linear layer, one output per class."""
        candidates = [
            name for name, module in self.layers.items()
            if is_linear(module) and getattr(module, "weight", None) is not None
            and module.weight.ndim == 2 and module.weight.shape[0] == self.spec.num_classes
        ]
        if not candidates:
            last = next((f"'{name}' ({type(module).__name__})" for name, module in reversed(self.layers.items())
                         if name and not list(module.children())), "no layer")
            raise TeacherError(
                f"{needed_by} needs the teacher's final linear layer (a weight of {self.spec.num_classes} rows, one per "
                f"class); found none, the last layer is {last}"
            )
        return candidates[-1]

    def class_weights(self, needed_by: str) -> torch.Tensor:
        """(classes x features) weight of the final linear layer: one vector per class."""
        return self.layers[self.classifier_name(needed_by)].weight.detach()

    def batch_norm_layer_names(self) -> list[str]:
        """The names of the layers that normalise by running statistics, in forward order; maybe none."""
        return [name for name, module in self.layers.items() if name and is_batch_norm(module)]

    def batch_norm_layers(self, needed_by: str) -> list[str]:
        """The names of the layers that normalise by running statistics, in forward order; a teacher
        without any is refused, saying that `needed_by` needs them."""
        names = self.batch_norm_layer_names()
        if not names:
            raise TeacherError(
                f"{needed_by} needs a teacher with batch-norm layers (running mean and variance to match); "
                f"this one has none: use a teacher with batch norm (e.g. resnet8 of the zoo), or dafl or zskd"
            )
        return names

    @contextmanager
    def capture(self, names: list[str], inputs: bool = False):
        """Collect what each named layer outputs (or, with `inputs`, receives) in one forward pass."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for name in names:
            if name not in self.layers:
                raise TeacherError(f"the teacher has no layer '{name}'")
            if inputs:
                hook = lambda module, args, name=name: captured.__setitem__(name, args[0])  # noqa: E731
                handles.append(self.layers[name].register_forward_pre_hook(hook))
            else:
                hook = lambda module, args, output, name=name: captured.__setitem__(name, output)  # noqa: E731
                handles.append(self.layers[name].register_forward_hook(hook))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the features before the classifier: the output of the model's `feature_layer`
        where it names one, else what its final linear layer receives (DAFL's f_T)."""
        feature_layer = getattr(self.model, "feature_layer", None)
        name = feature_layer or self.classifier_name("DAFL's activation loss")
        with self.capture([name], inputs=feature_layer is None) as captured:
            logits = self.model(images)
        return logits, captured[name]

    def forward_blocks(self, images: torch.Tensor, needed_by: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the output of each of the model's `block_layers`."""
        names = list(getattr(self.model, "block_layers", ()))
        if not names:
            raise TeacherError(f"{needed_by} needs the teacher's blocks (a zoo model's block_layers); this one names none")
        with self.capture(names) as captured:
            logits = self.model(images)
        return logits, [captured[name] for name in names]
