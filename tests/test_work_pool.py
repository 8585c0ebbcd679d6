"""The pipeline deployed on a Prefect work pool, with shared stores: a real Prefect server, a real
process worker, a real `mlflow server` and a local DVC remote, all started here on loopback."""

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, TINY_PARAMS, copy_project, environment, free_port, run, set_params, wait_for

POOL = "dfkd-test-pool"


@contextmanager
def started(command: list[str], cwd: Path, log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def stores(tmp_path) -> Iterator[dict[str, str]]:
    """A Prefect server with a process work pool and an MLflow tracking server; the environment that
    points at both."""
    prefect_port, mlflow_port = free_port(), free_port()
    env = environment(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
    )
    mlflow_server = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'tracking.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts"),
    ]
    prefect_server = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    with (
        started(mlflow_server, tmp_path, tmp_path / "mlflow-server.log", env),
        started(prefect_server, tmp_path, tmp_path / "prefect-server.log", env),
    ):
        wait_for(lambda: answers(f"http://127.0.0.1:{mlflow_port}/health"), timeout=180)
        wait_for(lambda: answers(f"http://127.0.0.1:{prefect_port}/api/health"), timeout=300)
        run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], tmp_path, **env)
        yield env


def test_a_sweep_runs_the_deployment_twice_at_once_each_in_its_own_clone_sharing_mlflow_and_dvc(tmp_path, stores):
    project = copy_project(tmp_path / "checkout", TINY_PARAMS)
    remote = tmp_path / "dvc-remote"
    remote.mkdir()
    run([str(BIN / "dvc"), "remote", "add", "--default", "shared", str(remote)], project)
    run(["git", "commit", "-q", "-am", "a shared DVC remote"], project)
    params_before = (project / "params.yaml").read_text()

    missing = run([sys.executable, "-m", "pipeline.deploy", "--pool", "nowhere"], project, check=False, **stores)
    assert missing.returncode == 2 and "--pool nowhere: no such work pool" in missing.stderr
    run([sys.executable, "-m", "pipeline.deploy", "--pool", POOL, "--concurrency-limit", "2"], project, **stores)

    api = stores["PREFECT_API_URL"]
    worker = [str(BIN / "prefect"), "worker", "start", "--pool", POOL]
    with started(worker, tmp_path, tmp_path / "worker.log", stores):
        # The sweep triggers the deployment twice at once, one run per value. Seeds, so that no stage's
        # inputs are the same in both: two runs of one stage may write bitwise different weights, and a
        # downstream stage is restored only after its own run's upstream outputs.
        sweep = run([sys.executable, "-m", "pipeline.sweep", "-G", "seed=1,2"], project, check=False, **stores)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr + (tmp_path / "worker.log").read_text()[-6000:]
    assert "| seed=1 | COMPLETED |" in sweep.stdout and "| seed=2 | COMPLETED |" in sweep.stdout
    listed = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"name": {"any_": ["dfkd-pool"]}}})
    finished = {run["parameters"]["overrides"]["seed"]: run for run in listed.raise_for_status().json()}
    assert sorted(finished) == [1, 2] and all(found["state_type"] == "COMPLETED" for found in finished.values())
    first, second = finished.values()
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"], "they ran at once"

    # The checkout was only read: its params.yaml is as it was and no stage wrote into it.
    assert (project / "params.yaml").read_text() == params_before
    assert not (project / "models").exists() and not (project / "dvc.lock").exists()

    client = MlflowClient(stores["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("data-free-distillation")
    (sweep_run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`dfkd.sweep` != ''")
    assert sweep_run.info.status == "FINISHED"
    assert {artifact.path for artifact in client.list_artifacts(sweep_run.info.run_id)} == {"comparison.md", "comparison.png"}
    for seed, found in finished.items():
        (parent,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{found['id']}'")
        assert parent.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id, "nested under the sweep's run"
        assert parent.info.status == "FINISHED" and parent.data.tags["overrides"] == repr({"seed": seed})
        assert 0 <= parent.data.metrics["student_accuracy"] <= 1
        (distill,) = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`dfkd.stage` = 'distill'",
        )
        assert distill.data.params["seed"] == str(seed)
    # The service finds the registered student's ONNX file on the tracking server, not in a run's clone.
    load = (f"from serving.model import resolve_source; from pathlib import Path; "
            f"print(resolve_source('models:/dfkd-student@candidate', Path('{tmp_path / 'download'}')).path)")
    onnx_file = Path(run([sys.executable, "-c", load], project, **stores).stdout.strip().splitlines()[-1])
    assert onnx_file.is_file() and onnx_file.suffix == ".onnx" and str(tmp_path / "download") in str(onnx_file)

    # Another machine, a fresh clone: every stage of a run's params comes from the DVC remote, none runs.
    elsewhere = tmp_path / "elsewhere"
    run(["git", "clone", "-q", str(project), str(elsewhere)], tmp_path)
    set_params(elsewhere, {"seed": 2})
    restored = run([str(BIN / "dvc"), "repro", "--pull"], elsewhere, **stores)
    assert "Running stage" not in restored.stdout, restored.stdout
    assert restored.stdout.count("is cached - skipping run") == 8
    assert (elsewhere / "models" / "student.pt").is_file() and json.loads((elsewhere / "metrics.json").read_text())
