"""Stage amalgamate_generator: the frozen teachers alone -> one generator for all of them.

A DAFL generator trained against every teacher at once (dfkd/amalgamation.py), saved as a transfer
set like the single-teacher pipeline's. Reads the teacher checkpoints and nothing else: no real data
is a dependency of this stage or of any after it but the evaluation.
"""

import json

import mlflow
import numpy as np
import torch

from dfkd.amalgamation import synthesize
from dfkd.checkpoint import atomic_path
from dfkd.models import LabelUnion
from dfkd.plots import save_class_grid, save_curves
from dfkd.synthesis.methods import save_transfer_set
from stages.amalgamate_teachers import load_teachers
from stages.common import MODELS, REPORTS, run, setup, stage_resume
from stages.params import load_params
from stages.tracking import CurveLogger, stage_run

TRANSFER_SET = MODELS / "amalgamation" / "transfer_set.pt"
OUT = REPORTS / "amalgamation" / "generator"
PREVIEW_SAMPLES = 1000


def main() -> None:
    params = load_params()
    settings = params.amalgamate
    device = setup(params)
    teachers = load_teachers(params)
    groups = tuple(tuple(spec.classes) for spec in settings.teachers.values())

    logged = {"seed": params.seed, "device": str(device), **settings.generator.model_dump()}
    resume = stage_resume("amalgamate_generator", every=100)
    with stage_run("amalgamate_generator", logged, params.mlflow.experiment, resume):
        curve = CurveLogger(OUT / "losses.csv", every=5)
        resume.attach(curve=curve)
        transfer_set = synthesize(list(teachers.values()), groups, settings.generator, device, curve, resume)
        # The generator is DAFL's, so the transfer set loads like any DAFL one.
        save_transfer_set(TRANSFER_SET, "dafl", transfer_set, next(iter(teachers.values())).spec, metadata={"seed": params.seed, "teachers": list(teachers)})

        # What the teachers, combined, see in the images: an uncovered class shows as an empty row.
        samples = transfer_set.sample(PREVIEW_SAMPLES)
        with torch.no_grad():
            logits = [teacher.to(device)(samples.to(device)).cpu() for teacher in teachers.values()]
            probabilities = torch.softmax(LabelUnion(groups)(logits), dim=1)
        predicted = probabilities.argmax(dim=1)
        counts = np.bincount(predicted.numpy(), minlength=probabilities.shape[1])
        share = counts / counts.sum()
        balance = {
            "class_counts": counts.tolist(),
            "class_entropy_bits": float(-(share[share > 0] * np.log2(share[share > 0])).sum()),
            "mean_union_confidence": float(probabilities.max(dim=1).values.mean()),
        }
        curve.write()
        save_curves(curve.rows, OUT / "losses.png", "Amalgamation generator losses")
        save_class_grid(samples.cpu(), predicted, probabilities.shape[1], OUT / "samples.png")
        with atomic_path(OUT / "balance.json") as tmp:
            tmp.write_text(json.dumps(balance, indent=2))
        mlflow.log_metrics({k: v for k, v in balance.items() if k != "class_counts"})
        mlflow.log_artifact(str(TRANSFER_SET), "checkpoint")
        mlflow.log_artifacts(str(OUT), "reports")
        resume.clear()
        print(f"amalgamate_generator: combined teacher classes over {PREVIEW_SAMPLES} samples {counts.tolist()}")


if __name__ == "__main__":
    run(main)
