"""Stage export: models/student.pt -> models/student.onnx, checked before it is kept.

The ONNX file has a dynamic batch axis and a pinned opset, passes `onnx.checker`, and must match
PyTorch on `export.parity_samples` inputs (max |logit difference| and argmax): otherwise the stage
fails and no ONNX file is left. The student is then logged with MLflow's ONNX flavour and registered.
"""

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from dfkd.checkpoint import atomic_path
from dfkd.classifier import load_classifier
from dfkd.export import ParityError, check_parity, export_onnx, onnx_logits, onnx_session
from dfkd.inputs import ONNX_METADATA_KEY
from stages.common import run, MODELS, REPORTS, RESUME, setup
from stages.params import Params, load_params
from stages.tracking import stage_run

OUT = REPORTS / "export"
ONNX_PATH = MODELS / "student.onnx"
ONNX_SHA256_TAG = "dfkd.onnx_sha256"


def export_student(
    params: Params, stage: str, student_path: Path, onnx_path: Path, out: Path, registered_model: str
) -> None:
    """Export the classifier at `student_path` to `onnx_path`, parity-checked, then log and register it
    (the amalgamation pipeline exports its student with the same code)."""
    settings = params.export
    setup(params)
    student = load_classifier(student_path)
    spec = student.spec
    # Parity on inputs shaped like both real and synthetic ones: noise in the normalised space.
    inputs = torch.randn(settings.parity_samples, *spec.shape)

    with stage_run(stage, {"seed": params.seed, **settings.model_dump()}, params.mlflow.experiment):
        # Checked in a scratch file first, so a failed check leaves no ONNX output behind.
        candidate = RESUME / onnx_path.name
        export_onnx(student.model, spec, candidate, settings.opset)
        try:
            parity = check_parity(student.model, candidate, inputs, settings.max_abs_diff)
        except ParityError:
            candidate.unlink()
            raise
        with atomic_path(onnx_path) as tmp:
            tmp.write_bytes(candidate.read_bytes())
        candidate.unlink()
        with atomic_path(out / "parity.json") as tmp:
            tmp.write_text(json.dumps({"opset": settings.opset, **parity}, indent=2))
        mlflow.log_metrics({"parity_max_abs_diff": parity["max_abs_diff"], "parity_argmax_mismatches": 0})

        example = inputs[:4].numpy()
        signature = infer_signature(example, onnx_logits(onnx_session(onnx_path), inputs[:4]))
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="student",
            signature=signature,
            input_example=example.astype(np.float32),
            registered_model_name=registered_model,
            metadata={ONNX_METADATA_KEY: spec.model_dump(mode="json")},  # beside the signature's (batch, C, H, W)
            save_as_external_data=False,  # one file, byte-identical to the exported ONNX file
            onnx_execution_providers=ort.get_available_providers(),  # MLflow's default names CUDA, even where absent
        )
        version = info.registered_model_version
        client = MlflowClient()
        client.set_registered_model_alias(registered_model, params.mlflow.alias, version)
        # The promotion gate checks that the version it promotes is the file the evaluation measured.
        client.set_model_version_tag(registered_model, version, ONNX_SHA256_TAG, hashlib.sha256(onnx_path.read_bytes()).hexdigest())
        print(
            f"{stage}: {onnx_path.name} opset {settings.opset}, parity max |diff| {parity['max_abs_diff']:.2e} "
            f"on {parity['samples']} inputs; registered {registered_model} v{version} @{params.mlflow.alias}"
        )


def main() -> None:
    params = load_params()
    export_student(params, "export", MODELS / "student.pt", ONNX_PATH, OUT, params.mlflow.registered_model)


if __name__ == "__main__":
    run(main)
