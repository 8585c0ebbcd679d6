"""The whole pipeline for real: dvc repro, MLflow on SQLite, onnxruntime, on a tiny config."""

import json

import mlflow
import numpy as np
import onnxruntime as ort
from mlflow.tracking import MlflowClient

from conftest import BIN, run
from dfkd.checkpoint import current_umask
from pipeline.flow import apply_overrides
from stages.params import load_params
from stages.tracking import INVOCATION_TAG

STAGES = {"prepare", "train_teacher", "synthesize", "distill", "baseline_noise", "baseline_real", "export", "evaluate"}


def test_dvc_repro_writes_metrics_for_every_model(tiny_project):
    metrics = json.loads((tiny_project / "metrics.json").read_text())
    for name in ("teacher", "student", "baseline_noise", "baseline_real"):
        assert 0 <= metrics[name]["accuracy"] <= 1 and metrics[name]["parameters"] > 0
    assert metrics["student"]["parameters"] < metrics["teacher"]["parameters"]
    assert metrics["student"]["flops"] < metrics["teacher"]["flops"]
    assert metrics["student"]["onnx_latency_batch256_p50_ms"] > 0
    assert metrics["test_size"] == 1000
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], tiny_project).stdout
    assert "student" in shown and "accuracy" in shown
    for report in ("synthesize/samples.png", "evaluate/confusion.png", "train_teacher/curve.png", "distill/curve.png"):
        assert (tiny_project / "reports" / report).read_bytes().startswith(b"\x89PNG")
    for output in ("models/teacher.pt", "models/student.onnx", "metrics.json", "reports/synthesize/balance.json"):
        assert (tiny_project / output).stat().st_mode & 0o777 == 0o666 & ~current_umask(), f"{output}: the user's umask"


def test_onnx_student_runs_in_onnxruntime_like_the_evaluation(tiny_project):
    session = ort.InferenceSession(str(tiny_project / "models/student.onnx"), providers=["CPUExecutionProvider"])
    (batch_input,) = session.get_inputs()
    assert batch_input.shape[1:] == [1, 32, 32] and not isinstance(batch_input.shape[0], int)
    logits = session.run(None, {batch_input.name: np.zeros((5, 1, 32, 32), dtype=np.float32)})[0]
    assert logits.shape == (5, 10)
    parity = json.loads((tiny_project / "reports/export/parity.json").read_text())
    assert parity["samples"] >= 256 and parity["max_abs_diff"] <= 1e-4 and parity["argmax_mismatches"] == 0


def test_mlflow_has_one_parent_run_with_a_nested_run_per_stage(tiny_project):
    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("data-free-distillation")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if INVOCATION_TAG in r.data.tags]
    assert len(parents) == 1, "all stages of the one dvc repro share one parent run"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.data.tags["dfkd.stage"] for r in children} == STAGES
    by_stage = {r.data.tags["dfkd.stage"]: r for r in children}
    assert by_stage["distill"].data.params["steps"] == "12"
    history = client.get_metric_history(by_stage["synthesize"].info.run_id, "entropy")
    assert len(history) >= 2, "per-step curves are logged"
    artifacts = {a.path for a in client.list_artifacts(by_stage["synthesize"].info.run_id, "reports")}
    assert "reports/samples.png" in artifacts
    assert parents[0].data.metrics["student_accuracy"] == by_stage["evaluate"].data.metrics["student_accuracy"]


def test_onnx_student_is_registered_with_an_alias(tiny_project):
    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / 'mlflow.db'}")
    version = MlflowClient().get_model_version_by_alias("dfkd-student", "candidate")
    model = mlflow.pyfunc.load_model("models:/dfkd-student@candidate")
    assert model.metadata.signature is not None
    output = model.predict(np.zeros((3, 1, 32, 32), dtype=np.float32))
    assert np.asarray(list(output.values())[0] if isinstance(output, dict) else output).shape == (3, 10)
    assert int(version.version) >= 1


def test_dvc_repro_reruns_only_what_a_change_affects(tiny_project):
    assert "Running stage" not in run([str(BIN / "dvc"), "repro", "--dry"], tiny_project).stdout
    params_file = tiny_project / "params.yaml"
    params = params_file.read_text()
    apply_overrides({"distill.dafl.steps": load_params(params_file).distill.dafl.steps + 1}, params_file)
    try:
        dry = run([str(BIN / "dvc"), "repro", "--dry"], tiny_project).stdout
    finally:
        params_file.write_text(params)
    # A dry run lists the stages whose own deps changed; export and evaluate follow once the
    # students' checkpoints really change. Nothing upstream of distillation reruns.
    rerun = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
    assert rerun == {"distill", "baseline_noise", "baseline_real"}


def test_options_of_the_method_not_selected_rerun_nothing(tiny_project):
    params_file = tiny_project / "params.yaml"
    params = params_file.read_text()
    current = load_params(params_file)
    apply_overrides(
        {"synthesize.zskd.steps": current.synthesize.zskd.steps + 1, "distill.zskd.steps": current.distill.zskd.steps + 1},
        params_file,
    )
    try:
        dry = run([str(BIN / "dvc"), "repro", "--dry"], tiny_project).stdout
    finally:
        params_file.write_text(params)
    assert "Running stage" not in dry, "DAFL is selected: its synthesis and distillations do not read zskd options"
