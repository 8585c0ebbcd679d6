"""Stage amalgamate_teachers: the specialised teachers that the amalgamation pipeline starts from.

One LeNet-5 per entry of `amalgamate.teachers`, trained (with the `train_teacher` recipe) on the
train split's images of its own classes only, labels renumbered to its outputs, its epoch picked on
the validation images of those classes. An entry with a `checkpoint` is your own classifier instead:
it is checked and copied, not trained. Every teacher lands in models/amalgamation/teachers/<name>.pt.
This is the last amalgamation stage that reads real training data.
"""

import json

import mlflow
import torch

from dfkd.amalgamation import AmalgamationError, check_teachers
from dfkd.checkpoint import atomic_path
from dfkd.classifier import build_classifier, check_classifier, freeze, load_classifier, save_classifier
from dfkd.teacher import Teacher
from dfkd.plots import save_curves
from dfkd.train import train_classifier
from stages.common import MODELS, REPORTS, data_spec, load_model_input, run, setup, stage_resume
from stages.params import ROOT, Params, load_params
from stages.tracking import CurveLogger, stage_run

TEACHERS = MODELS / "amalgamation" / "teachers"
OUT = REPORTS / "amalgamation" / "teachers"


def teacher_classes(params: Params) -> dict[str, list[int]]:
    return {name: teacher.classes for name, teacher in params.amalgamate.teachers.items()}


def load_teachers(params: Params) -> dict[str, Teacher]:
    """The stage's teachers, frozen, in params order (teacher i feeds the student's head i)."""
    classifiers = {name: load_classifier(TEACHERS / f"{name}.pt") for name in params.amalgamate.teachers}
    check_teachers({name: classifier.spec for name, classifier in classifiers.items()}, teacher_classes(params))
    return {name: Teacher(freeze(classifier.model), classifier.spec) for name, classifier in classifiers.items()}


def main() -> None:
    params = load_params()
    settings = params.amalgamate
    device = setup(params)
    spec = data_spec(params.teacher.image_size)
    train_images, train_labels = load_model_input("train", spec)
    val_images, val_labels = load_model_input("val", spec)
    classes = teacher_classes(params)
    data_classes = int(train_labels.max()) + 1
    covered = max(max(labels) for labels in classes.values()) + 1
    if covered != data_classes:
        raise AmalgamationError(
            f"amalgamate.teachers cover classes 0..{covered - 1} but the data has {data_classes} classes"
        )

    # Every teacher checked before any is trained: your own checkpoints against the shape of the
    # data that the others are trained on, and against their declared classes.
    teachers = {
        name: load_classifier(ROOT / teacher.checkpoint) if teacher.checkpoint
        else build_classifier("lenet5", {}, spec.model_copy(update={"class_names": [spec.class_names[k] for k in teacher.classes]}))
        for name, teacher in settings.teachers.items()
    }
    for name, teacher in teachers.items():
        check_classifier(teacher, settings.teachers[name].checkpoint or f"teacher '{name}'")
    check_teachers({name: teacher.spec for name, teacher in teachers.items()}, classes)

    logged = {"seed": params.seed, "device": str(device), **params.train_teacher.model_dump(),
              "teachers": {name: declared.model_dump() for name, declared in settings.teachers.items()}}
    # One resume state per trained teacher, each kept until the stage ends (a rerun after a kill skips
    # the teachers already trained); the first one also keeps the stage's MLflow run.
    resumes = {
        name: stage_resume("amalgamate_teachers", every=1, file_name=f"amalgamate_teacher_{name}")
        for name, teacher in settings.teachers.items() if not teacher.checkpoint
    }
    with stage_run("amalgamate_teachers", logged, params.mlflow.experiment, next(iter(resumes.values()), None)):
        summary = {}
        for name, declared in settings.teachers.items():
            if declared.checkpoint:
                summary[name] = {"classes": declared.classes, "source": declared.checkpoint}
                save_classifier(TEACHERS / f"{name}.pt", teachers[name], metadata=summary[name])
                continue
            # Global label -> this teacher's output index (-1: not one of its classes).
            local = torch.full((data_classes,), -1, dtype=torch.long)
            local[declared.classes] = torch.arange(len(declared.classes))
            mine, mine_val = local[train_labels] >= 0, local[val_labels] >= 0
            curve = CurveLogger(OUT / f"{name}_curve.csv")
            resumes[name].attach(curve=curve)
            _, best = train_classifier(
                teachers[name].model, train_images[mine], local[train_labels[mine]], val_images[mine_val],
                local[val_labels[mine_val]], params.train_teacher, device,
                on_epoch=lambda epoch, metrics: curve(epoch, {f"{name}_{k}": v for k, v in metrics.items()}),
                resume=resumes[name], compiled=params.compile,
            )
            summary[name] = {"classes": declared.classes, "source": "trained", "train_images": int(mine.sum()), **best}
            teachers[name].model.cpu()
            save_classifier(TEACHERS / f"{name}.pt", teachers[name], metadata={"selected_on": "val", **summary[name]})
            curve.write()
            save_curves(curve.rows, OUT / f"{name}_curve.png", f"Teacher '{name}' (classes {declared.classes})")
            mlflow.log_metric(f"{name}_best_val_accuracy", best["val_accuracy"])
            print(f"teacher '{name}' {declared.classes}: best validation accuracy {best['val_accuracy']:.4f} "
                  f"at epoch {best['epoch']}")
        with atomic_path(OUT / "teachers.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        mlflow.log_artifacts(str(TEACHERS), "checkpoints")
        mlflow.log_artifacts(str(OUT), "reports")
        for resume in resumes.values():
            resume.clear()


if __name__ == "__main__":
    run(main)
