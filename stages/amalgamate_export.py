"""Stage amalgamate_export: models/amalgamation/student.pt -> models/amalgamation/student.onnx.

The same export as the single-teacher pipeline's (stages/export.py: dynamic batch axis, pinned
opset, `onnx.checker`, parity against PyTorch or the stage fails), registered in MLflow under
`amalgamate.registered_model`. The ONNX graph gives the combined prediction over all the teachers'
labels: one logit per class.
"""

from stages.amalgamate_student import TRAININGS
from stages.common import MODELS, REPORTS, run
from stages.export import export_student
from stages.params import load_params

ONNX_PATH = MODELS / "amalgamation" / "student.onnx"


def main() -> None:
    params = load_params()
    student_path = TRAININGS["group_stack"][1]
    out = REPORTS / "amalgamation" / "export"
    export_student(params, "amalgamate_export", student_path, ONNX_PATH, out, params.amalgamate.registered_model)


if __name__ == "__main__":
    run(main)
