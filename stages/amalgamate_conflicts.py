"""Stage amalgamate_conflicts: the frozen teachers alone -> images that every teacher claims.

Each image is optimised from noise until every teacher takes it for one of its own classes (a class
drawn at random per teacher and image): the look-alikes across teachers that real data is full of
(a real 9 is a 4 to a teacher of digits 0-4) and the generator rarely makes. The student learns on
them, from the teachers' own outputs, which teacher to believe. Reads the teacher checkpoints and
nothing else.
"""

import mlflow
import torch

from dfkd.amalgamation import synthesize_conflicts
from dfkd.checkpoint import ResumeState, save_checkpoint
from dfkd.models import LabelUnion
from dfkd.plots import save_class_grid, save_curves
from stages.amalgamate_teachers import load_teachers
from stages.common import MODELS, REPORTS, RESUME, run, setup
from stages.params import load_params
from stages.tracking import CurveLogger, stage_run

CONFLICTS = MODELS / "amalgamation" / "conflicts.pt"
OUT = REPORTS / "amalgamation" / "conflicts"


def main() -> None:
    params = load_params()
    settings = params.amalgamate.conflicts
    device = setup(params)
    teachers = load_teachers(params)
    groups = tuple(tuple(spec.classes) for spec in params.amalgamate.teachers.values())

    logged = {"seed": params.seed, "device": str(device), **settings.model_dump()}
    with stage_run("amalgamate_conflicts", logged, params.mlflow.experiment):
        curve = CurveLogger(OUT / "losses.csv", every=5)
        resume = ResumeState(RESUME / "amalgamate_conflicts.pt", {**logged, "groups": groups}, every=1)
        conflicts = synthesize_conflicts(list(teachers.values()), settings, device, curve, resume)
        save_checkpoint(CONFLICTS, {"kind": "conflict_images", "images": conflicts.images,
                                    "metadata": {"seed": params.seed, "teachers": list(teachers)}})

        union = LabelUnion(groups)
        with torch.no_grad():  # which teacher wins each image, by the combined prediction
            logits = [teacher.to(device)(conflicts.images.to(device)).cpu() for teacher in teachers.values()]
            predicted = union(logits).argmax(dim=1)
        curve.write()
        save_curves(curve.rows, OUT / "losses.png", "Conflict images: each teacher's cross-entropy")
        save_class_grid(conflicts.images, predicted, union.num_classes, OUT / "samples.png",
                        title="Conflict images by the teachers' combined prediction (count)")
        mlflow.log_artifact(str(CONFLICTS), "checkpoint")
        mlflow.log_artifacts(str(OUT), "reports")
        resume.clear()
        print(f"amalgamate_conflicts: {len(conflicts.images)} images claimed by all {len(teachers)} teachers")


if __name__ == "__main__":
    run(main)
