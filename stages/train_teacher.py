"""Stage train_teacher: LeNet-5 trained on the train split, the epoch picked on validation.

Outputs models/teacher.pt (weights + architecture, loadable with weights_only=True) and the
training curves. The test split is not read here.
"""

import json

import mlflow

from dfkd.checkpoint import atomic_path, save_classifier
from dfkd.models import ArchitectureConfig, LeNet5
from dfkd.plots import save_curves
from dfkd.train import train_classifier
from stages.common import run, MODELS, REPORTS, load_model_input, setup, stage_resume
from stages.params import load_params
from stages.tracking import CurveLogger, stage_run

OUT = REPORTS / "train_teacher"


def main() -> None:
    params = load_params()
    settings = params.train_teacher
    device = setup(params)
    train_images, train_labels = load_model_input("train")
    val_images, val_labels = load_model_input("val")
    num_classes = int(train_labels.max()) + 1
    model = LeNet5(ArchitectureConfig(in_channels=1, num_classes=num_classes))

    logged = {"seed": params.seed, "device": str(device), **settings.model_dump()}
    resume = stage_resume("train_teacher", every=1)
    with stage_run("train_teacher", logged, params.mlflow.experiment, resume):
        curve = CurveLogger(OUT / "curve.csv")
        resume.attach(curve=curve)
        teacher, best = train_classifier(
            model, train_images, train_labels, val_images, val_labels, settings, device, on_epoch=curve, resume=resume
        )
        save_classifier(MODELS / "teacher.pt", teacher, metadata={"selected_on": "val", **best})
        curve.write()
        save_curves(curve.rows, OUT / "curve.png", "Teacher training")
        with atomic_path(OUT / "best.json") as tmp:
            tmp.write_text(json.dumps(best, indent=2))
        mlflow.log_metrics({f"best_{name}": value for name, value in best.items()})
        mlflow.log_artifact(str(MODELS / "teacher.pt"), "checkpoint")
        mlflow.log_artifacts(str(OUT), "reports")
        resume.clear()
        print(f"teacher: best validation accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}")


if __name__ == "__main__":
    run(main)
