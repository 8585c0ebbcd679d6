"""DVC reruns what a change affects, data outside the repository included, and MLflow agrees with
the files DVC leaves on disk, also when it restores them from its run-cache instead of running."""

import hashlib
import json
import sys

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from conftest import BIN, TINY_PARAMS, copy_project, run
from pipeline.flow import REUSED_TAG, apply_overrides
from test_readers import write_idx, write_idx_folder

DVC = str(BIN / "dvc")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_relabelled_data_outside_the_repository_reruns_prepare(tmp_path):
    data = tmp_path / "my-mnist"  # a user's IDX download, outside the repository
    data.mkdir()
    write_idx_folder(data, np.random.default_rng(0))  # 12 training images, 5 test ones
    root = copy_project(tmp_path / "project", {"prepare": {"source": "idx", "data_dir": str(data)}})
    run([DVC, "repro", "prepare"], root)
    assert "up to date" in run([DVC, "status", "prepare"], root).stdout

    write_idx(data / "train-labels-idx1-ubyte", (np.arange(12, dtype=np.uint8) + 1) % 10)
    status = run([DVC, "status", "prepare"], root).stdout
    assert "changed deps" in status and str(data) in status


def test_zskd_then_back_to_dafl_restores_dafl_and_mlflow_follows(tmp_path):
    root = copy_project(tmp_path, TINY_PARAMS)
    run([DVC, "repro"], root)
    dafl_onnx, dafl_metrics = sha256(root / "models/student.onnx"), (root / "metrics.json").read_text()
    apply_overrides({"synthesize.method": "zskd"}, root / "params.yaml")
    run([DVC, "repro"], root)
    assert sha256(root / "models/student.onnx") != dafl_onnx

    # Back to DAFL through the flow: DVC restores every DAFL output from its run-cache, no stage runs.
    result = run(
        [sys.executable, "tests/flow_in_harness.py", json.dumps({"synthesize.method": "dafl"})],
        root, PYTHONPATH=str(root), PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["state"] == "COMPLETED"
    assert sha256(root / "models/student.onnx") == dafl_onnx
    assert (root / "metrics.json").read_text() == dafl_metrics
    assert "reused by DVC, not run: prepare, train_teacher, synthesize, distill" in report["summary"]

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = MlflowClient()
    candidate = client.get_model_version_by_alias("dfkd-student", "candidate")
    assert candidate.tags["dfkd.onnx_sha256"] == dafl_onnx, "candidate is the restored file's version again"
    assert candidate.tags["dfkd.gate"] == "failed" and "below promote.min_accuracy" in candidate.tags["dfkd.gate_reasons"]
    experiment = client.get_experiment_by_name("data-free-distillation")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`prefect.flow_run_id` != ''")
    assert parent.data.metrics["student_accuracy"] == json.loads(dafl_metrics)["student"]["accuracy"]
    assert parent.data.tags[REUSED_TAG].split(", ")[-2:] == ["export", "evaluate"]
