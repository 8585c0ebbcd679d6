"""The amalgamation pipeline for real: dvc repro amalgamation/dvc.yaml, MLflow on SQLite, onnxruntime,
the Prefect flow's amalgamation variant, and its bad-input errors, on a tiny config."""

import json
import sys

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import BIN, TINY_PARAMS, copy_project, merge, run
from dfkd.checkpoint import load_checkpoint, save_checkpoint
from dfkd.classifier import build_classifier, save_classifier
from dfkd.inputs import InputSpec
from pipeline.flow import AMALGAMATION_STAGES
from stages.tracking import INVOCATION_TAG

TINY_AMALGAMATION = merge(
    {key: dict(value) for key, value in TINY_PARAMS.items()},
    {
        "amalgamate": {
            "generator": {"steps": 6, "batch_size": 32, "generator_width": 8},
            "conflicts": {"images": 24, "batch_size": 12, "steps": 3},
            "student": {"block_steps": 2, "head_steps": 2, "end_to_end_steps": 4, "batch_size": 32, "pool_size": 128},
        }
    },
)
STAGES = {"prepare", "train_teacher"} | {stage.rpartition(":")[2] for stage in AMALGAMATION_STAGES}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project, tiny params, after one real `dvc repro amalgamation/dvc.yaml`."""
    root = copy_project(tmp_path_factory.mktemp("amalgamation"), TINY_AMALGAMATION)
    run([str(BIN / "dvc"), "repro", "amalgamation/dvc.yaml"], root)
    return root


def test_repro_writes_every_figure_of_the_comparison(project):
    metrics = json.loads((project / "amalgamation/metrics.json").read_text())
    assert set(metrics["teachers"]) == {"digits_0_4", "digits_5_9"}
    assert metrics["teachers"]["digits_5_9"]["classes"] == [5, 6, 7, 8, 9]
    assert sum(t["own_class_images"] for t in metrics["teachers"].values()) == metrics["test_size"] == 1000
    for key in ("naive_combination", "teachers_label_union", "teachers_raw_label_union", "student", "student_end_to_end", "reference"):
        assert 0 <= metrics[key]["accuracy"] <= 1 and metrics[key]["parameters"] > 0
    assert set(metrics["teachers_label_union"]["offsets"]) == {"digits_0_4", "digits_5_9"}
    student = metrics["student"]
    assert student["parameters"] < metrics["naive_combination"]["parameters"]  # fewer than the teachers together
    assert metrics["student_parameter_ratio"] == student["parameters"] / metrics["naive_combination"]["parameters"]
    assert metrics["student_above_naive"] == student["accuracy"] - metrics["naive_combination"]["accuracy"]
    assert abs(student["onnx_accuracy"] - student["accuracy"]) <= 0.002
    assert set(student["head_own_class_accuracy"]) == {"digits_0_4", "digits_5_9"}
    assert "student_above_naive" in run([str(BIN / "dvc"), "metrics", "show", "--json"], project).stdout
    for report in ("generator/samples.png", "conflicts/samples.png", "evaluate/confusion.png", "group_stack/curve.png", "teachers/digits_0_4_curve.png"):
        assert (project / "reports/amalgamation" / report).read_bytes().startswith(b"\x89PNG")


def test_the_onnx_student_gives_the_combined_ten_class_prediction(project):
    session = ort.InferenceSession(str(project / "models/amalgamation/student.onnx"), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.shape[1:] == [1, 32, 32] and not isinstance(image.shape[0], int)
    logits = session.run(None, {image.name: np.random.default_rng(0).standard_normal((5, 1, 32, 32), dtype=np.float32)})[0]
    assert logits.shape == (5, 10) and np.isfinite(logits).all()
    parity = json.loads((project / "reports/amalgamation/export/parity.json").read_text())
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_mismatches"] == 0


def test_mlflow_has_one_parent_run_with_a_nested_run_per_stage(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("data-free-distillation")
    (parent,) = [r for r in client.search_runs([experiment.experiment_id]) if INVOCATION_TAG in r.data.tags]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["dfkd.stage"]: r for r in children}
    assert set(by_stage) == STAGES
    assert by_stage["amalgamate_group_stack"].data.params["block_steps"] == "2"
    assert len(client.get_metric_history(by_stage["amalgamate_generator"].info.run_id, "union_entropy")) >= 2
    evaluate = by_stage["amalgamate_evaluate"].data.metrics
    assert parent.data.metrics["amalgamation_student_accuracy"] == evaluate["amalgamation_student_accuracy"]
    model = mlflow.pyfunc.load_model("models:/dfkd-amalgamated-student@candidate")
    output = model.predict(np.zeros((3, 1, 32, 32), dtype=np.float32))
    assert np.asarray(list(output.values())[0] if isinstance(output, dict) else output).shape == (3, 10)


def test_only_the_teacher_stage_reads_real_training_data_and_root_repro_leaves_it_alone(project):
    lock = yaml.safe_load((project / "amalgamation/dvc.lock").read_text())["stages"]
    for stage, entry in lock.items():
        deps = {dep["path"] for dep in entry.get("deps", [])}
        reads_train = any(path.startswith(("data/prepared/train", "data/prepared/val")) for path in deps)
        assert reads_train == (stage == "amalgamate_teachers"), stage
    assert "Running stage" not in run([str(BIN / "dvc"), "repro", "--dry", "amalgamation/dvc.yaml"], project).stdout
    # A plain `dvc repro` at the root reproduces the root dvc.yaml's stages, the ones listed here.
    root_stages = run([str(BIN / "dvc"), "stage", "list", "--name-only"], project).stdout.split()
    assert "synthesize" in root_stages and not any("amalgamate" in stage for stage in root_stages)


def test_the_flow_runs_the_amalgamation_variant(project):
    result = run(
        [sys.executable, "tests/flow_in_harness.py", json.dumps({"amalgamate.student.end_to_end_steps": 5}), "amalgamation"],
        project,
        PYTHONPATH=str(project),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["state"] == "COMPLETED"
    assert sorted(name for name, state in report["task_runs"] if state == "Completed") == sorted(AMALGAMATION_STAGES)
    for row in ("naive combination", "group-stack", "reference", "digits_0_4"):
        assert row in report["summary"]
    metrics = json.loads((project / "amalgamation/metrics.json").read_text())
    assert metrics["student"]["parameters"] < metrics["naive_combination"]["parameters"]


def set_teachers(project, teachers: dict) -> str:
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["amalgamate"]["teachers"] = teachers
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return original


def run_stage(project, stage):
    return run([sys.executable, "-m", f"stages.{stage}"], project, check=False, MLFLOW_TRACKING_URI="sqlite:///unused.db")


@pytest.mark.parametrize(
    "teachers, expected",
    [
        ({"all": {"classes": list(range(10))}}, "amalgamation needs at least two teachers, got 1 ('all')"),
        (
            {"low": {"classes": [0, 1, 2, 3, 4, 5]}, "high": {"classes": [5, 6, 7, 8, 9]}},
            "teachers 'low' and 'high' both predict class 5, which shared_classes does not declare",
        ),
    ],
)
def test_bad_teacher_lists_stop_the_stage_before_training(project, teachers, expected):
    original = set_teachers(project, teachers)
    try:
        result = run_stage(project, "amalgamate_teachers")
    finally:
        (project / "params.yaml").write_text(original)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_a_teacher_of_another_input_shape_is_named_before_training(project):
    torch.manual_seed(0)
    colour = InputSpec(channels=3, size=32, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=tuple("56789"))
    save_classifier(project / "amalgamation/teachers/colour.pt", build_classifier("lenet5", {}, colour))
    original = set_teachers(
        project,
        {"digits_0_4": {"classes": [0, 1, 2, 3, 4]},
         "colour": {"classes": [5, 6, 7, 8, 9], "checkpoint": "amalgamation/teachers/colour.pt"}},
    )
    try:
        result = run_stage(project, "amalgamate_teachers")
    finally:
        (project / "params.yaml").write_text(original)
        (project / "amalgamation/teachers/colour.pt").unlink()
    assert result.returncode == 2
    assert ("teacher 'colour' takes 3x32x32 inputs normalised by mean [0.5, 0.5, 0.5], std [0.25, 0.25, 0.25] but "
            "teacher 'digits_0_4' takes 1x32x32 by mean [0.1307], std [0.3081]") in result.stderr


def test_conflict_images_made_for_other_teachers_are_refused_before_training(project):
    conflicts = project / "models/amalgamation/conflicts.pt"
    original = conflicts.read_bytes()
    payload = load_checkpoint(conflicts, "conflict_images")
    payload["offsets"] = {"digits_0_4": 1.0, "letters": 2.0}
    save_checkpoint(conflicts, payload)
    try:
        result = run_stage(project, "amalgamate_student")
    finally:
        conflicts.write_bytes(original)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "made for teachers ['digits_0_4', 'letters'], not ['digits_0_4', 'digits_5_9']" in result.stderr
