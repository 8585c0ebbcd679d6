"""Stage train_teacher: models/teacher.pt, the classifier every later stage distils from.

With `teacher.source: train`, an architecture of the zoo trained on the train split, the epoch picked
on validation; its input description comes from the prepared data (data/prepared/dataset.json).
With `teacher.source: checkpoint`, the user's own classifier (a torch.export `.pt2` file or a state
dict), checked before anything else runs: it loads, takes a batch of its declared input, answers one
output per class, and knows every class of the data. Either way the checkpoint holds the input
description, and loads with weights_only=True. The test split is not read here.
"""

import json

import mlflow

from dfkd.checkpoint import atomic_path
from dfkd.classifier import Classifier, build_classifier, check_classifier, load_user_classifier, save_classifier
from dfkd.distributed import is_main
from dfkd.plots import save_curves
from dfkd.train import accuracy, predict, train_classifier
from stages.common import MODELS, REPORTS, data_spec, load_model_input, run, setup, stage_resume
from stages.params import ROOT, load_params
from stages.tracking import CurveLogger, stage_run

OUT = REPORTS / "train_teacher"


def main() -> None:
    params = load_params()
    settings = params.teacher
    device = setup(params)
    if settings.source == "checkpoint":
        if not is_main():  # nothing to train: rank 0 checks and copies the checkpoint
            return
        checkpoint = ROOT / settings.checkpoint
        teacher = load_user_classifier(checkpoint, settings.architecture, settings.options, settings.input)
        check_classifier(teacher, str(checkpoint))
        val_images, val_labels = load_model_input("val", teacher.spec)  # also: every data class is the teacher's
        logged = {"seed": params.seed, "source": "checkpoint", "checkpoint": settings.checkpoint,
                  "architecture": teacher.architecture}
        with stage_run("train_teacher", logged, params.mlflow.experiment):
            best = {"epoch": 0, "val_accuracy": accuracy(predict(teacher.model, val_images, device), val_labels)}
            curve = CurveLogger(OUT / "curve.csv")
            curve(0, {"val_accuracy": best["val_accuracy"]})
            save_teacher(teacher, {"source": settings.checkpoint, **best}, curve)
        return

    spec = data_spec(params.teacher.image_size)
    model = build_classifier(settings.architecture, settings.options, spec)
    check_classifier(model, f"teacher.architecture {settings.architecture}")
    train_images, train_labels = load_model_input("train", spec)
    val_images, val_labels = load_model_input("val", spec)
    logged = {"seed": params.seed, "device": str(device), "architecture": settings.architecture,
              **settings.options, **params.train_teacher.model_dump()}
    resume = stage_resume("train_teacher", every=1)
    with stage_run("train_teacher", logged, params.mlflow.experiment, resume):
        curve = CurveLogger(OUT / "curve.csv")
        resume.attach(curve=curve)
        _, best = train_classifier(
            model.model, train_images, train_labels, val_images, val_labels, params.train_teacher, device,
            on_epoch=curve if is_main() else None, resume=resume, compiled=params.compile,
        )
        if not is_main():  # the other ranks' work ends with the training
            return
        save_teacher(model, {"selected_on": "val", **best}, curve)
        resume.clear()


def save_teacher(teacher: Classifier, best: dict, curve: CurveLogger) -> None:
    """The teacher's checkpoint, its curve and figures, logged to the stage's MLflow run."""
    save_classifier(MODELS / "teacher.pt", teacher, metadata=best)
    curve.write()
    save_curves(curve.rows, OUT / "curve.png", "Teacher training")
    with atomic_path(OUT / "best.json") as tmp:
        tmp.write_text(json.dumps(best, indent=2))
    mlflow.log_metrics({f"best_{name}": value for name, value in best.items() if isinstance(value, (int, float))})
    mlflow.log_dict(teacher.spec.model_dump(mode="json"), "input_spec.json")
    mlflow.log_artifact(str(MODELS / "teacher.pt"), "checkpoint")
    mlflow.log_artifacts(str(OUT), "reports")
    print(f"teacher ({teacher.architecture}): validation accuracy {best['val_accuracy']:.4f}"
          + (f" at epoch {best['epoch']}" if best.get("epoch") else ""))


if __name__ == "__main__":
    run(main, data_parallel=True)
