"""Stage evaluate: every model on the real test split, the only stage that reads it.

Writes metrics.json (for `dvc metrics show`): teacher, the synthetic-data student (PyTorch and
ONNX), both baselines, agreement with the teacher, sizes, FLOPs and ONNX latency; plus the
confusion matrix (CSV for `dvc plots`, PNG) and per-class accuracy.
"""

import csv
import json
from pathlib import Path

import mlflow
import numpy as np

from dfkd.checkpoint import atomic_path
from dfkd.classifier import load_classifier
from dfkd.evaluation import (
    confusion_matrix,
    file_size,
    flops_per_image,
    onnx_latency_ms,
    parameter_count,
    per_class_accuracy,
)
from dfkd.export import onnx_logits, onnx_session
from dfkd.plots import save_matrix
from dfkd.train import predict
from stages.common import run, MODELS, REPORTS, load_model_input, setup
from stages.params import ROOT, load_params
from stages.tracking import stage_run

OUT = REPORTS / "evaluate"
METRICS = ROOT / "metrics.json"
ONNX_PATH = MODELS / "student.onnx"
CHECKPOINTS = {
    "teacher": MODELS / "teacher.pt",
    "student": MODELS / "student.pt",
    "baseline_noise": MODELS / "student_noise.pt",
    "baseline_real": MODELS / "student_real.pt",
}


def write_json(path, payload) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def write_confusion_reports(out: Path, actual: np.ndarray, predicted: np.ndarray, matrix: np.ndarray, title: str) -> list[float]:
    """The student's confusion matrix as CSV (for `dvc plots`) and PNG, and its per-class accuracy,
    which is returned (NaN for a class absent from `actual`)."""
    per_class = per_class_accuracy(matrix)
    with atomic_path(out / "confusion.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["actual", "predicted"])
            writer.writerows(zip(actual.tolist(), predicted.tolist()))
    with atomic_path(out / "per_class.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "student_accuracy"])
            writer.writerows(enumerate(per_class))
    save_matrix(matrix, out / "confusion.png", title)
    return per_class


def headline_metrics(metrics: dict) -> dict[str, float]:
    """The figures that put pipeline runs side by side, logged on the parent run too."""
    return {f"{name}_accuracy": metrics[name]["accuracy"] for name in CHECKPOINTS}


def main() -> None:
    params = load_params()
    settings = params.evaluate
    device = setup(params)
    classifiers = {name: load_classifier(path) for name, path in CHECKPOINTS.items()}
    models = {name: classifier.model for name, classifier in classifiers.items()}
    spec = classifiers["teacher"].spec
    session = onnx_session(ONNX_PATH)
    images, labels = load_model_input("test", spec)
    labels_np = labels.numpy()
    num_classes = spec.num_classes
    input_shape = tuple(images.shape[1:])

    with stage_run("evaluate", {"seed": params.seed, **settings.model_dump()}, params.mlflow.experiment):
        predictions = {name: predict(model, images, device).argmax(1).numpy() for name, model in models.items()}
        onnx_predictions = onnx_logits(session, images).argmax(1)
        teacher_accuracy = float((predictions["teacher"] == labels_np).mean())
        metrics: dict = {"seed": params.seed, "test_size": len(labels_np)}
        for name, model in models.items():
            accuracy = float((predictions[name] == labels_np).mean())
            metrics[name] = {
                "accuracy": accuracy,
                "parameters": parameter_count(model),
                "flops": flops_per_image(model, input_shape),
                "checkpoint_bytes": file_size(CHECKPOINTS[name]),
            }
            if name != "teacher":
                metrics[name]["teacher_agreement"] = float((predictions[name] == predictions["teacher"]).mean())
                metrics[name]["gap_to_teacher"] = teacher_accuracy - accuracy
        student = metrics["student"]
        student["onnx_accuracy"] = float((onnx_predictions == labels_np).mean())
        student["onnx_bytes"] = file_size(ONNX_PATH)
        for batch in (1, 256):
            latency = onnx_latency_ms(session, input_shape, batch, settings.latency_repeats)
            student[f"onnx_latency_batch{batch}_p50_ms"] = latency["p50_ms"]
            student[f"onnx_latency_batch{batch}_p95_ms"] = latency["p95_ms"]
        metrics["student_above_noise"] = student["accuracy"] - metrics["baseline_noise"]["accuracy"]

        matrix = confusion_matrix(predictions["student"], labels_np, num_classes)
        write_json(METRICS, metrics)
        per_class = write_confusion_reports(OUT, labels_np, predictions["student"], matrix, "Student on the real test split")

        flat = {
            f"{name}_{key}": value
            for name, values in metrics.items()
            if isinstance(values, dict)
            for key, value in values.items()
        }
        mlflow.log_metrics(flat)
        mlflow.log_metrics({f"student_class_{k}_accuracy": v for k, v in enumerate(per_class) if not np.isnan(v)})
        mlflow.log_artifact(str(METRICS))
        mlflow.log_artifacts(str(OUT), "reports")
        parent = mlflow.active_run().data.tags.get("mlflow.parentRunId")
        headline = headline_metrics(metrics)
        client = mlflow.tracking.MlflowClient()
        for name, value in headline.items():
            client.log_metric(parent, name, value)
        print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in headline.items()))


if __name__ == "__main__":
    run(main)
