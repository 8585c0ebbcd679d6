"""The Prefect flow over the DVC stages, against Prefect's real test harness."""

import json
import sys

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import BIN, copy_project, free_port, run
from pipeline.flow import STAGES, apply_overrides, parse_overrides
from stages.params import ParamsError


def test_flow_runs_every_stage_as_a_task_and_publishes_the_summary(tiny_project):
    result = run(
        [sys.executable, "tests/flow_in_harness.py", json.dumps({"distill.dafl.steps": 14})],
        tiny_project,
        PYTHONPATH=str(tiny_project),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["state"] == "COMPLETED"
    assert sorted(name for name, state in report["task_runs"] if state == "Completed") == sorted(STAGES + ["promote"])
    summary = report["summary"]
    for row in ("teacher", "floor", "synthetic", "ceiling", "synthesis"):
        assert row in summary
    # A few distillation steps cannot reach promote.min_accuracy: the gate keeps the student and says why.
    assert "NOT promoted; @champion is on no version yet" in summary and "below promote.min_accuracy" in summary
    assert yaml.safe_load((tiny_project / "params.yaml").read_text())["distill"]["dafl"]["steps"] == 14

    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("data-free-distillation")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`prefect.flow_run_id` != ''")
    assert parent.info.status == "FINISHED" and parent.data.metrics["seconds_synthesize"] >= 0
    assert parent.data.metrics["promoted"] == 0 and "below promote.min_accuracy" in parent.data.tags["promotion"]
    candidate = client.get_model_version_by_alias("dfkd-student", "candidate")
    assert candidate.tags["dfkd.gate"] == "failed" and "champion" not in client.get_registered_model("dfkd-student").aliases

    # What the runs wrote is ignored by git (artifacts beside the store) or staged by DVC: `git status`
    # shows nothing new to puzzle over.
    assert experiment.artifact_location == (tiny_project / "mlartifacts").as_uri()
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], tiny_project).stdout.splitlines()
    assert [line for line in status if line.startswith("??")] == []
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    # DVC skipped the stages the override does not affect; those that ran are nested under the flow's run.
    assert {r.data.tags["dfkd.stage"] for r in children} == {
        "distill", "baseline_noise", "baseline_real", "export", "evaluate"
    }


def test_overrides_are_validated_before_params_yaml_changes(tmp_path):
    params = tmp_path / "params.yaml"
    original = "# comment kept\ndistill:\n  lr: 0.002\n  dafl:\n    steps: 10  # inline comment\n"
    params.write_text(original)
    params.chmod(0o640)
    with pytest.raises(ParamsError, match=r"distill.lr: Input should be greater than 0"):
        apply_overrides({"distill.lr": -1.0}, params)
    assert params.read_text() == original
    with pytest.raises(ParamsError, match="params.yaml has no section 'nowhere'"):
        apply_overrides({"nowhere.steps": 1}, params)
    apply_overrides(parse_overrides(["distill.dafl.steps=30"]), params)
    assert "steps: 30  # inline comment" in params.read_text() and "# comment kept" in params.read_text()
    assert params.stat().st_mode & 0o777 == 0o640, "the file keeps its mode"


def test_override_syntax_errors_are_reported():
    assert parse_overrides(["seed=3", "distill.lr=1e-3"]) == {"seed": 3, "distill.lr": 1e-3}
    with pytest.raises(ParamsError, match="-S seed: not of the form key=value"):
        parse_overrides(["seed"])
    with pytest.raises(ParamsError, match=r"-S seed=\[1: the value is not valid YAML"):
        parse_overrides(["seed=[1"])


@pytest.mark.parametrize(
    "override, expected",
    [("distill.lr=-1", "distill.lr: Input should be greater than 0"), ("seed=[1", "the value is not valid YAML")],
)
def test_a_bad_override_is_one_line_and_exit_code_2_before_prefect_starts(tmp_path, override, expected):
    root = copy_project(tmp_path, {})
    result = run([sys.executable, "-m", "pipeline.flow", "-S", override], root, check=False)
    assert result.returncode == 2 and expected in result.stderr
    assert "Traceback" not in result.stderr and "prefect" not in (result.stdout + result.stderr).lower()


def test_an_unreachable_tracking_server_or_dvc_remote_is_one_line_naming_it_before_prefect_starts(tmp_path):
    root = copy_project(tmp_path, {})
    nobody = f"http://127.0.0.1:{free_port()}"
    result = run([sys.executable, "-m", "pipeline.flow"], root, check=False, MLFLOW_TRACKING_URI=nobody)
    assert result.returncode == 2 and f"MLFLOW_TRACKING_URI={nobody}: no MLflow tracking server answers" in result.stderr
    stage = run([sys.executable, "-m", "stages.prepare"], root, check=False, MLFLOW_TRACKING_URI=nobody)
    assert stage.returncode == 2 and "no MLflow tracking server answers" in stage.stderr and "Traceback" not in stage.stderr

    run([str(BIN / "dvc"), "remote", "add", "--default", "shared", str(tmp_path / "not-mounted")], root)
    result = run([sys.executable, "-m", "pipeline.flow"], root, check=False)
    assert result.returncode == 2 and "DVC remote 'shared'" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr and not (root / "mlflow.db").exists()


def test_sweep_and_deploy_settings_are_checked_before_anything_starts(tmp_path):
    root = copy_project(tmp_path, {})
    bad_grid = run([sys.executable, "-m", "pipeline.sweep", "-G", "seed"], root, check=False)
    assert bad_grid.returncode == 2 and "-G seed: not of the form key=value1,value2" in bad_grid.stderr
    bad_value = run([sys.executable, "-m", "pipeline.sweep", "-G", "distill.lr=0.1,-1"], root, check=False)
    assert bad_value.returncode == 2 and "distill.lr: Input should be greater than 0" in bad_value.stderr
    for command in (["pipeline.sweep", "-G", "seed=0,1"], ["pipeline.deploy", "--pool", "dfkd-process"]):
        no_server = run([sys.executable, "-m", *command], root, check=False)
        assert no_server.returncode == 2 and "PREFECT_API_URL is not set" in no_server.stderr
