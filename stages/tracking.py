"""MLflow for the stages: one parent run per pipeline run, one nested run per stage.

Stages are separate processes (DVC starts each one), so they find their shared parent run by:
1. `DFKD_PARENT_RUN_ID`, set by whoever drives the pipeline (the Prefect flow, `pipeline.run`);
2. otherwise the `dvc` process that started them: every stage of one `dvc repro` or `dvc exp run`
   shares the parent run tagged with that process's id and start time;
3. otherwise (a stage run by hand) a parent run of its own.
Tracking defaults to the SQLite file `mlflow.db` at the repository root; MLFLOW_TRACKING_URI overrides.
"""

import csv
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psutil
from mlflow.tracking import MlflowClient

from dfkd.checkpoint import atomic_path
from stages.params import ROOT

PARENT_RUN_ENV = "DFKD_PARENT_RUN_ID"
INVOCATION_TAG = "dfkd.invocation"
STAGE_TAG = "dfkd.stage"  # on each stage's nested run: the DVC stage name


def configure(experiment: str) -> str:
    """Point MLflow at the project's store and experiment; return the experiment id."""
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}")
    found = mlflow.get_experiment_by_name(experiment)
    if found:
        experiment_id = found.experiment_id
    else:
        experiment_id = mlflow.create_experiment(experiment, artifact_location=(ROOT / "mlartifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _dvc_invocation() -> str | None:
    """An id of the nearest `dvc` ancestor process, unique across time and hosts, or None."""
    for process in psutil.Process().parents():
        try:
            command = process.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if any(Path(part).name == "dvc" for part in command[:2]):
            return f"{socket.gethostname()}:{process.pid}:{process.create_time():.3f}"
    return None


def parent_run_id(experiment_id: str, stage: str) -> str:
    if os.environ.get(PARENT_RUN_ENV):
        return os.environ[PARENT_RUN_ENV]
    client = MlflowClient()
    invocation = _dvc_invocation()
    if invocation:
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        return client.create_run(
            experiment_id, run_name="dvc repro", tags={INVOCATION_TAG: invocation}
        ).info.run_id
    return client.create_run(experiment_id, run_name=f"{stage} (by hand)").info.run_id


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextmanager
def stage_run(stage: str, params: dict, experiment: str) -> Iterator[mlflow.ActiveRun]:
    """A nested MLflow run for `stage` under the pipeline run's parent, with `params` logged."""
    experiment_id = configure(experiment)
    parent = parent_run_id(experiment_id, stage)
    with mlflow.start_run(run_id=parent):
        with mlflow.start_run(run_name=stage, nested=True, tags={STAGE_TAG: stage}) as run:
            mlflow.log_params(flatten(params))
            yield run


class CurveLogger:
    """Per-step metrics, every `every` steps and always the last one: to the active MLflow run
    (asynchronously, so logging never slows training) and to a CSV file that DVC plots."""

    def __init__(self, csv_path: Path, every: int = 1):
        self.csv_path = csv_path
        self.every = every
        self.rows: list[dict[str, float]] = []
        self.pending: dict[str, float] | None = None

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.pending = {"step": step, **metrics}
        if step % self.every == 0:
            self._record()

    def _record(self) -> None:
        row, self.pending = self.pending, None
        mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]), synchronous=False)
        self.rows.append(row)

    def write(self) -> None:
        """Record the last step if it fell between two intervals, then write the CSV."""
        if self.pending:
            self._record()
        with atomic_path(self.csv_path) as tmp:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]) if self.rows else ["step"])
                writer.writeheader()
                writer.writerows(self.rows)
