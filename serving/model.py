"""The served classifier: where the ONNX file comes from, its preprocessing, and inference.

Everything the preprocessing needs travels in the ONNX file's metadata as one JSON object, the
pipeline's `dfkd.inputs.InputSpec` (written by the export stage): nothing here restates a pixel
statistic, an image size or a class name.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

REGISTRY_SCHEME = "models:/"
# The repository's MLflow store, as the pipeline's stages use it (MLFLOW_TRACKING_URI overrides).
DEFAULT_TRACKING_URI = f"sqlite:///{Path(__file__).resolve().parents[1] / 'mlflow.db'}"
INPUT_SPEC_KEY = "input_spec"  # the ONNX metadata key the export stage writes (dfkd.inputs.ONNX_METADATA_KEY)


class ModelSourceError(ValueError):
    """A model file or registry URI that cannot be served; the message names it and says why."""


class InputSpec(BaseModel):
    """What the model takes: `dfkd.inputs.InputSpec`, restated field for field because serving imports
    neither the pipeline nor PyTorch (a test holds the two to one JSON schema). Square images of
    `channels` x `size` x `size`, pixel values in [0, 1] normalised per channel: (x - mean) / std."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a field this server does not know may change the input

    channels: Literal[1, 3]
    size: int = Field(ge=8)
    mean: tuple[float, ...]
    std: tuple[PositiveFloat, ...]
    class_names: tuple[str, ...] = Field(min_length=2)
    resize: Literal["pad", "bilinear"] = "bilinear"  # "pad": a smaller square is centred on zeros

    @model_validator(mode="after")
    def check_channels(self):
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise ValueError(f"{name} needs one value per channel ({self.channels}), got {list(getattr(self, name))}")
        return self

    @property
    def sides(self) -> range:
        """The square sides the model's preprocessing takes without resizing: `size`, and any smaller one with "pad"."""
        return range(1 if self.resize == "pad" else self.size, self.size + 1)


def read_input_spec(path: Path, metadata: dict[str, str], input_shape: list, output_shape: list) -> InputSpec:
    """The file's input spec, checked against the model's own input and output shapes where they are fixed."""
    if INPUT_SPEC_KEY not in metadata:
        raise ModelSourceError(f"{path}: the ONNX metadata lacks {INPUT_SPEC_KEY} (export it with `python -m stages.export`)")
    try:
        spec = InputSpec.model_validate_json(metadata[INPUT_SPEC_KEY])
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc']))}: {item['msg']}" if item["loc"] else item["msg"]
            for item in error.errors(include_url=False)
        )
        raise ModelSourceError(f"{path}: the ONNX metadata's {INPUT_SPEC_KEY} is invalid ({problems})") from None
    expected = [spec.channels, spec.size, spec.size]
    if len(input_shape) != 4 or any(type(dim) is int and dim != want for dim, want in zip(input_shape[1:], expected)):
        raise ModelSourceError(f"{path}: {INPUT_SPEC_KEY} describes {spec.channels}x{spec.size}x{spec.size} images, "
                               f"the model takes {input_shape}")
    if type(output_shape[-1]) is int and output_shape[-1] != len(spec.class_names):
        raise ModelSourceError(f"{path}: {INPUT_SPEC_KEY} names {len(spec.class_names)} classes, "
                               f"the model has {output_shape[-1]} outputs")
    return spec


@dataclass(frozen=True)
class ModelSource:
    """A local ONNX file and where it came from."""

    path: Path
    name: str
    version: str | None  # the registry version; None for a plain file


def resolve_source(model: str, download_dir: Path) -> ModelSource:
    """`model` is an ONNX file path, `models:/<name>@<alias>` or `models:/<name>/<version>`.
    A registry model is downloaded into `download_dir` (MLflow is imported only here)."""
    if not model.startswith(REGISTRY_SCHEME):
        path = Path(model)
        if not path.is_file():
            raise ModelSourceError(f"--model {model}: no such ONNX file")
        return ModelSource(path, path.stem, None)

    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise ModelSourceError(f"--model {model}: registry URIs need MLflow (pip install -r requirements.txt)") from None

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    reference = model.removeprefix(REGISTRY_SCHEME)
    name, at, alias = reference.partition("@")
    client = mlflow.tracking.MlflowClient()
    try:
        if at:
            version = client.get_model_version_by_alias(name, alias).version
        else:
            name, _, version = reference.partition("/")
            client.get_model_version(name, version)
        # The exact version, so the alias moving meanwhile cannot mix two models.
        local = Path(mlflow.artifacts.download_artifacts(f"{REGISTRY_SCHEME}{name}/{version}", dst_path=str(download_dir)))
        onnx_file = mlflow.models.Model.load(local).flavors["onnx"]["data"]
    except (MlflowException, KeyError) as error:
        raise ModelSourceError(f"--model {model}: cannot be loaded from {mlflow.get_tracking_uri()} ({error})") from None
    return ModelSource(local / onnx_file, name, str(version))


class Classifier:
    """One onnxruntime session (one per worker process) and the pipeline's preprocessing."""

    def __init__(self, source: ModelSource, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle pool threads sleep instead of spinning: on a small machine spinning steals the
        # event loop's core between requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(source.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped errors for a bad file
            raise ModelSourceError(f"{source.path}: not a loadable ONNX model ({error})") from None
        (model_input,) = self.session.get_inputs()
        model_output = self.session.get_outputs()[0]
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.spec = read_input_spec(source.path, metadata, model_input.shape, model_output.shape)
        self.source = source
        self.sha256 = hashlib.sha256(source.path.read_bytes()).hexdigest()
        self.input_name = model_input.name
        self.input_shape = model_input.shape  # e.g. ['batch', 3, 32, 32]
        self.output_name = model_output.name
        # float32 (1, C, 1, 1): normalising is float32 arithmetic, as in the pipeline
        self.mean = np.asarray(self.spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(self.spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
        self.ready = False

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """Pixel values in 0..1, each (H, W, C) with C the model's channels and H = W in `spec.sides` ->
        the model's float32 (N, C, S, S): centred zero padding to S, then (x - mean[c]) / std[c], to the
        bit what `dfkd.data.to_model_input` does."""
        size = self.spec.size
        batch = np.zeros((len(images), self.spec.channels, size, size), dtype=np.float32)
        for index, image in enumerate(images):
            side = image.shape[0]
            pad = (size - side) // 2
            batch[index, :, pad : pad + side, pad : pad + side] = image.transpose(2, 0, 1)
        return (batch - self.mean) / self.std

    def probabilities(self, model_input: np.ndarray) -> np.ndarray:
        logits = self.session.run([self.output_name], {self.input_name: model_input})[0].astype(np.float64)
        exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exponentials / exponentials.sum(axis=1, keepdims=True)

    def warm_up(self) -> None:
        """First runs allocate onnxruntime's buffers; do them before the first request does."""
        for batch_size in (1, 8):
            blank = np.zeros((self.spec.size, self.spec.size, self.spec.channels), np.float32)
            self.probabilities(self.preprocess([blank] * batch_size))
        self.ready = True


def default_threads(workers: int) -> int:
    """onnxruntime intra-op threads per worker: the cores this process may use, shared by the workers."""
    return max(1, len(os.sched_getaffinity(0)) // workers)
