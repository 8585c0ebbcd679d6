"""Stage amalgamate_student: the TargetNet trained from the teachers on synthetic images alone: the
generator's and the conflict images, in the shares `amalgamate.student.conflict_share` sets. Its
target is the teachers' label union with each teacher's logits lowered by the offset measured on
the conflict images.

    python -m stages.amalgamate_student --training group_stack   # the product: block by block, heads, end to end
    python -m stages.amalgamate_student --training end_to_end    # the ablation: end to end only, same step count

Both use the same `amalgamate.student` params. The student of the last step is kept: no real data
is used to train or pick it.
"""

import argparse

import mlflow

from dfkd.amalgamation import StudentConfig, amalgamate
from dfkd.classifier import TARGETNET, build_classifier, save_classifier
from dfkd.plots import save_curves
from dfkd.synthesis import Mixture
from dfkd.synthesis.methods import load_transfer_set
from stages.amalgamate_conflicts import load_conflicts
from stages.amalgamate_generator import TRANSFER_SET
from stages.amalgamate_teachers import load_teachers
from stages.common import MODELS, REPORTS, data_spec, run, setup, stage_resume
from stages.params import load_params
from stages.tracking import CurveLogger, stage_run

# training -> (DVC stage name, student checkpoint)
TRAININGS = {
    "group_stack": ("amalgamate_group_stack", MODELS / "amalgamation" / "student.pt"),
    "end_to_end": ("amalgamate_end_to_end", MODELS / "amalgamation" / "student_end_to_end.pt"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training", choices=TRAININGS, default="group_stack", help="the training schedule")
    training = parser.parse_args().training
    stage, student_path = TRAININGS[training]
    out = REPORTS / "amalgamation" / training

    params = load_params()
    settings = params.amalgamate.student
    device = setup(params)
    teachers = load_teachers(params)
    conflicts, offsets = load_conflicts(list(teachers))
    share = settings.conflict_share
    spec = data_spec(params.teacher.image_size)  # the union of the teachers' classes: the data's
    transfer_set = Mixture([load_transfer_set(TRANSFER_SET, device, next(iter(teachers.values())).spec), conflicts],
                           [1 - share, share])
    groups = [list(declared.classes) for declared in params.amalgamate.teachers.values()]
    student = build_classifier(TARGETNET, {"groups": groups, "width": settings.width}, spec)

    logged = {"seed": params.seed, "device": str(device), "training": training, **settings.model_dump()}
    resume = stage_resume(stage, every=200)
    with stage_run(stage, logged, params.mlflow.experiment, resume):
        curve = CurveLogger(out / "curve.csv", every=5)
        resume.attach(curve=curve)
        config = StudentConfig(**settings.model_dump(exclude={"width", "conflict_share"}))
        amalgamate(student.model, list(teachers.values()), transfer_set, offsets, config, device,
                   group_stack=training == "group_stack", on_step=curve, resume=resume)
        student.model.cpu()
        save_classifier(student_path, student, metadata={"training": training, "teachers": list(teachers),
                                                               "seed": params.seed})
        curve.write()
        save_curves(curve.rows, out / "curve.png", f"Amalgamation, {training.replace('_', ' ')}")
        mlflow.log_metrics({f"final_{name}": value for name, value in curve.rows[-1].items() if name != "step"})
        mlflow.log_artifact(str(student_path), "checkpoint")
        mlflow.log_artifacts(str(out), "reports")
        resume.clear()
        steps = sum(steps for _, steps in config.phases(training == "group_stack", len(student.model.blocks)))
        print(f"{stage}: TargetNet trained for {steps} steps on synthetic images ({share:.0%} conflict images)")


if __name__ == "__main__":
    run(main)
