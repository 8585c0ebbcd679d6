"""Stage synthesize: the frozen teacher alone -> a transfer set (models/transfer_set.pt).

Reads the teacher checkpoint and nothing else: no real data is a dependency of this stage.
The method is `synthesize.method` in params.yaml, with its options under its own key.
"""

import json

import mlflow
import numpy as np
import torch

from dfkd.checkpoint import atomic_path
from dfkd.classifier import freeze, load_classifier
from dfkd.distributed import is_main
from dfkd.plots import save_class_grid, save_curves
from dfkd.synthesis.methods import METHODS, save_transfer_set
from dfkd.teacher import Teacher
from stages.common import run, MODELS, REPORTS, setup, stage_resume
from stages.params import load_params
from stages.tracking import CurveLogger, stage_run

OUT = REPORTS / "synthesize"
PREVIEW_SAMPLES = 1000


def main() -> None:
    params = load_params()
    method = params.synthesize.method
    settings = getattr(params.synthesize, method)
    device = setup(params)
    classifier = load_classifier(MODELS / "teacher.pt")
    teacher = Teacher(freeze(classifier.model), classifier.spec).to(device)
    chosen = METHODS[method]

    logged = {"seed": params.seed, "device": str(device), "method": method, method: settings.model_dump()}
    resume = stage_resume("synthesize", every=100)
    with stage_run("synthesize", logged, params.mlflow.experiment, resume):
        curve = CurveLogger(OUT / "losses.csv", every=5)
        resume.attach(curve=curve)
        transfer_set = chosen.synthesize(teacher, settings, device, on_step=curve if is_main() else None,
                                         resume=resume)
        if not is_main():  # the other ranks' work ends with the synthesis
            return
        save_transfer_set(MODELS / "transfer_set.pt", method, transfer_set, teacher.spec, metadata={"seed": params.seed})

        # What the teacher sees in the transfer set: a collapsed generator shows as empty classes.
        samples = transfer_set.sample(PREVIEW_SAMPLES)
        with torch.no_grad():
            probabilities = torch.softmax(teacher(samples.to(device)), dim=1).cpu()
        predicted = probabilities.argmax(dim=1)
        counts = np.bincount(predicted.numpy(), minlength=teacher.spec.num_classes)
        share = counts / counts.sum()
        balance = {
            "class_counts": counts.tolist(),
            "class_entropy_bits": float(-(share[share > 0] * np.log2(share[share > 0])).sum()),
            "mean_teacher_confidence": float(probabilities.max(dim=1).values.mean()),
        }
        curve.write()
        save_curves(curve.rows, OUT / "losses.png", f"{method} synthesis losses")
        save_class_grid(samples.cpu(), predicted, teacher.spec.num_classes, OUT / "samples.png")
        chosen.save_figures(transfer_set, OUT / "method")
        with atomic_path(OUT / "balance.json") as tmp:
            tmp.write_text(json.dumps(balance, indent=2))
        mlflow.log_metrics({k: v for k, v in balance.items() if k != "class_counts"})
        mlflow.log_artifact(str(MODELS / "transfer_set.pt"), "checkpoint")
        mlflow.log_artifacts(str(OUT), "reports")
        resume.clear()
        print(f"synthesize ({method}): teacher classes over {PREVIEW_SAMPLES} samples {counts.tolist()}")


if __name__ == "__main__":
    run(main, data_parallel=True)
