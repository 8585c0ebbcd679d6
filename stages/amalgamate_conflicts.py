"""Stage amalgamate_conflicts: the frozen teachers alone -> images that every teacher claims.

Each image is optimised from noise until every teacher takes it for one of its own classes (a class
drawn at random per teacher and image): the look-alikes across teachers that real data is full of
(a real 9 is a 4 to a teacher of digits 0-4) and the generator rarely makes. The student learns on
them, from the teachers' own outputs, which teacher to believe. Reads the teacher checkpoints and
nothing else. The teachers' logit offsets for their label union (`teacher_offsets`) are measured on
these images and saved with them.
"""

import mlflow
import torch

from dfkd.amalgamation import offset_logits, synthesize_conflicts, teacher_offsets
from dfkd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dfkd.models import LabelUnion
from dfkd.plots import save_class_grid, save_curves
from dfkd.synthesis import FixedImages
from stages.amalgamate_teachers import load_teachers
from stages.common import MODELS, REPORTS, run, setup, stage_resume
from stages.params import load_params
from stages.tracking import CurveLogger, stage_run

CONFLICTS = MODELS / "amalgamation" / "conflicts.pt"
OUT = REPORTS / "amalgamation" / "conflicts"


def load_conflicts(teacher_names: list[str]) -> tuple[FixedImages, list[float]]:
    """The conflict images and each named teacher's logit offset, in the order of `teacher_names`."""
    payload = load_checkpoint(CONFLICTS, "conflict_images")
    offsets = payload.get("offsets", {})
    if sorted(offsets) != sorted(teacher_names):
        raise CheckpointError(f"{CONFLICTS}: made for teachers {sorted(offsets)}, not {sorted(teacher_names)}; "
                              "run amalgamate_conflicts again")
    return FixedImages(payload["images"]), [offsets[name] for name in teacher_names]


def main() -> None:
    params = load_params()
    settings = params.amalgamate.conflicts
    device = setup(params)
    teachers = load_teachers(params)
    groups = tuple(tuple(spec.classes) for spec in params.amalgamate.teachers.values())

    logged = {"seed": params.seed, "device": str(device), **settings.model_dump()}
    resume = stage_resume("amalgamate_conflicts", every=1)
    with stage_run("amalgamate_conflicts", logged, params.mlflow.experiment, resume):
        curve = CurveLogger(OUT / "losses.csv", every=5)
        resume.attach(curve=curve)
        conflicts = synthesize_conflicts(list(teachers.values()), settings, device, curve, resume)
        with torch.no_grad():
            logits = [teacher.to(device)(conflicts.images.to(device)).cpu() for teacher in teachers.values()]
        offsets = teacher_offsets(logits)
        save_checkpoint(CONFLICTS, {"kind": "conflict_images", "images": conflicts.images,
                                    "offsets": dict(zip(teachers, offsets)),
                                    "metadata": {"seed": params.seed, "teachers": list(teachers)}})
        mlflow.log_metrics({f"offset_{name}": offset for name, offset in zip(teachers, offsets)})

        union = LabelUnion(groups)
        predicted = union(offset_logits(logits, offsets)).argmax(dim=1)  # which teacher wins each image
        curve.write()
        save_curves(curve.rows, OUT / "losses.png", "Conflict images: each teacher's cross-entropy")
        save_class_grid(conflicts.images, predicted, union.num_classes, OUT / "samples.png",
                        title="Conflict images by the teachers' combined prediction (count)")
        mlflow.log_artifact(str(CONFLICTS), "checkpoint")
        mlflow.log_artifacts(str(OUT), "reports")
        resume.clear()
        print(f"amalgamate_conflicts: {len(conflicts.images)} images claimed by all {len(teachers)} teachers; "
              "logit offsets " + ", ".join(f"{name} {offset:.3f}" for name, offset in zip(teachers, offsets)))


if __name__ == "__main__":
    run(main)
