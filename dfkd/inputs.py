"""What a classifier takes as input, as one typed object stored with every model made from it.

The teacher's `InputSpec` travels into every checkpoint, the transfer set, the ONNX file's metadata
(`ONNX_METADATA_KEY`, as JSON), the MLflow signature and the server; nothing else restates a pixel
statistic, an image size or a class name.
"""

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

ONNX_METADATA_KEY = "input_spec"


class InputSpec(BaseModel):
    """Square images of `channels` x `size` x `size`, pixel values scaled to [0, 1] and then
    normalised per channel: (x - mean) / std."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: Literal[1, 3]  # grayscale or RGB
    size: int = Field(ge=8)  # the side the model takes
    mean: tuple[float, ...]  # per channel, of pixel values in [0, 1]
    std: tuple[PositiveFloat, ...]
    class_names: tuple[str, ...] = Field(min_length=2)
    # How an image of another side is brought to `size`: "pad" centres one no larger than `size` on
    # a zero background (MNIST's 28x28 digits in LeNet-5's 32x32 input); "bilinear" resizes any side.
    resize: Literal["pad", "bilinear"] = "bilinear"

    @model_validator(mode="after")
    def check_channels(self):
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise ValueError(f"{name} needs one value per channel ({self.channels}), got {list(getattr(self, name))}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) pixel values in [0, 1] -> the model's input."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def pixels(self, inputs: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalise`: model inputs -> pixel values (not clipped)."""
        mean = torch.tensor(self.mean, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
        return inputs * std + mean
