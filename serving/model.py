"""The served classifier: where the ONNX file comes from, its preprocessing, and inference.

Everything the preprocessing needs travels in the ONNX file's metadata (written by the export
stage from `dfkd.data`): nothing here restates a pixel statistic or an image size.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

REGISTRY_SCHEME = "models:/"
# The repository's MLflow store, as the pipeline's stages use it (MLFLOW_TRACKING_URI overrides).
DEFAULT_TRACKING_URI = f"sqlite:///{Path(__file__).resolve().parents[1] / 'mlflow.db'}"
REQUIRED_METADATA = ("pixel_mean", "pixel_std", "input_size", "image_sizes", "class_names")


class ModelSourceError(ValueError):
    """A model file or registry URI that cannot be served; the message names it and says why."""


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
        metadata = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in REQUIRED_METADATA if key not in metadata]
        if missing:
            raise ModelSourceError(
                f"{source.path}: the ONNX metadata lacks {', '.join(missing)} (export it with `python -m stages.export`)"
            )
        self.source = source
        self.sha256 = hashlib.sha256(source.path.read_bytes()).hexdigest()
        self.pixel_mean = float(metadata["pixel_mean"])
        self.pixel_std = float(metadata["pixel_std"])
        self.input_size = int(metadata["input_size"])
        self.image_sizes = tuple(json.loads(metadata["image_sizes"]))
        self.class_names = json.loads(metadata["class_names"])
        (model_input,) = self.session.get_inputs()
        self.input_name = model_input.name
        self.input_shape = model_input.shape  # e.g. ['batch', 1, 32, 32]
        self.output_name = self.session.get_outputs()[0].name
        self.ready = False

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """Pixel values in 0..1, (H, W) with H = W in `image_sizes` -> the model's normalised
        float32 (N, 1, S, S): centred zero padding to S, then (x - mean) / std, as `dfkd.data` does."""
        size = self.input_size
        batch = np.zeros((len(images), 1, size, size), dtype=np.float32)
        for index, image in enumerate(images):
            pad = (size - image.shape[0]) // 2
            batch[index, 0, pad : pad + image.shape[0], pad : pad + image.shape[1]] = image
        return (batch - self.pixel_mean) / self.pixel_std

    def probabilities(self, model_input: np.ndarray) -> np.ndarray:
        logits = self.session.run([self.output_name], {self.input_name: model_input})[0].astype(np.float64)
        exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exponentials / exponentials.sum(axis=1, keepdims=True)

    def warm_up(self) -> None:
        """First runs allocate onnxruntime's buffers; do them before the first request does."""
        for batch_size in (1, 8):
            self.probabilities(self.preprocess([np.zeros((self.input_size,) * 2, np.float32)] * batch_size))
        self.ready = True


def default_threads(workers: int) -> int:
    """onnxruntime intra-op threads per worker: the cores this process may use, shared by the workers."""
    return max(1, len(os.sched_getaffinity(0)) // workers)
