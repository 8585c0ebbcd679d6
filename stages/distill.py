"""Stage distill: the student (`distill.student`, LeNet-5-half by default) distilled from the teacher
on a transfer set.

    python -m stages.distill --source synthetic   # the product: the synthesize stage's transfer set
    python -m stages.distill --source noise       # floor baseline: Gaussian noise
    python -m stages.distill --source real        # ceiling baseline: the real train split

All three use the same settings: `distill` with the recipe of the selected synthesis method
(`distill.<synthesize.method>`), so they differ only in what the student sees. The student of the
last step is kept: no real data is used to pick it.
"""

import argparse

import mlflow

from dfkd.classifier import build_classifier, check_classifier, freeze, load_classifier, save_classifier
from dfkd.distill import distill
from dfkd.distributed import is_main
from dfkd.plots import save_curves
from dfkd.synthesis import GaussianNoise, FixedImages
from dfkd.synthesis.methods import load_transfer_set
from stages.common import run, MODELS, REPORTS, load_model_input, setup, stage_resume
from stages.params import load_params
from stages.tracking import CurveLogger, stage_run

# source -> (DVC stage name, student checkpoint, report directory)
SOURCES = {
    "synthetic": ("distill", MODELS / "student.pt", REPORTS / "distill"),
    "noise": ("baseline_noise", MODELS / "student_noise.pt", REPORTS / "baseline_noise"),
    "real": ("baseline_real", MODELS / "student_real.pt", REPORTS / "baseline_real"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=SOURCES, default="synthetic", help="what the student is trained on")
    source = parser.parse_args().source
    stage, student_path, out = SOURCES[source]

    params = load_params()
    method = params.synthesize.method
    settings = params.distill
    config = settings.config(method)
    device = setup(params)
    teacher = load_classifier(MODELS / "teacher.pt")
    spec = teacher.spec
    if source == "synthetic":
        transfer_set = load_transfer_set(MODELS / "transfer_set.pt", device, spec)
    elif source == "noise":
        transfer_set = GaussianNoise(spec.shape)
    else:
        transfer_set = FixedImages(load_model_input("train", spec)[0])
    # The student takes the teacher's input (the transfer set is in the teacher's input space); built
    # after the transfer set is loaded, which draws a generator's initial weights from the same RNG.
    student = build_classifier(settings.student.architecture, settings.student.options, spec)
    check_classifier(student, f"distill.student {settings.student.architecture}")

    logged = {
        "seed": params.seed, "device": str(device), "source": source, "recipe": method,
        "student": settings.student.architecture, **settings.student.options, **config.model_dump(),
    }
    resume = stage_resume(stage, every=200)
    with stage_run(stage, logged, params.mlflow.experiment, resume):
        curve = CurveLogger(out / "curve.csv", every=5)
        resume.attach(curve=curve)
        distill(student.model, freeze(teacher.model), transfer_set, config, device,
                on_step=curve if is_main() else None, resume=resume, compiled=params.compile)
        if not is_main():  # the other ranks' work ends with the training
            return
        student.model.cpu()
        save_classifier(student_path, student, metadata={"source": source, "seed": params.seed})
        curve.write()
        save_curves(curve.rows, out / "curve.png", f"Distillation on {source} images")
        mlflow.log_metrics({f"final_{name}": value for name, value in curve.rows[-1].items() if name != "step"})
        mlflow.log_artifact(str(student_path), "checkpoint")
        mlflow.log_artifacts(str(out), "reports")
        resume.clear()
        print(f"{stage}: distilled on {source} images for {config.steps} steps")


if __name__ == "__main__":
    run(main, data_parallel=True)
