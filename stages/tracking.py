"""MLflow for the stages: one parent run per pipeline run, one nested run per stage.

Stages are separate processes (DVC starts each one), so they find their shared parent run by:
1. `DFKD_PARENT_RUN_ID`, set by whoever drives the pipeline (the Prefect flow, `pipeline.run`),
   which also ends it;
2. otherwise the `dvc` process that started them: every stage of one `dvc repro` or `dvc exp run`
   shares the parent run tagged with that process's id and start time. No stage can tell whether it
   is the last one, so the first starts a watcher (`python -m stages.tracking RUN_ID`) that ends the
   parent once the dvc process has exited: KILLED or FAILED if a stage was, else FINISHED;
3. otherwise (a stage run by hand) a parent run of its own, ended with the stage.
A stage's run ends FINISHED, FAILED (an error) or KILLED (Ctrl-C). Every run records the process
that owns it (PROCESS_TAG); one left RUNNING by a process that is gone (killed too hard to end it)
is ended as KILLED when the next stage starts. A stage given its resume state keeps its run id
there: resumed, it reopens that run, so one run holds the whole training.
Tracking defaults to the SQLite file `mlflow.db` at the repository root; MLFLOW_TRACKING_URI overrides.
"""

import csv
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import psutil
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from dfkd.checkpoint import ResumeState, atomic_path
from dfkd.distributed import is_main
from stages.params import ROOT

PARENT_RUN_ENV = "DFKD_PARENT_RUN_ID"
INVOCATION_TAG = "dfkd.invocation"
STAGE_TAG = "dfkd.stage"  # on each stage's nested run: the DVC stage name
PROCESS_TAG = "dfkd.process"  # on every run: the process whose end ends the run (host:pid:start time)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the setting."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, checked when it names a server, or the project's own SQLite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{ROOT / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two links at every run's end
        try:  # a quick answer now: MLflow's own client retries a lost server for minutes
            httpx.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
        except httpx.HTTPError as error:
            raise TrackingError(f"MLFLOW_TRACKING_URI={uri}: no MLflow tracking server answers there ({error})") from None
    return uri


def configure(experiment: str) -> str:
    """Point MLflow at the tracking store and experiment; return the experiment id."""
    # The project's store keeps artifacts beside it; a shared one (a server) decides itself where.
    # Asked before set_tracking_uri, which exports MLFLOW_TRACKING_URI.
    own_store = not os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = mlflow.create_experiment(
                experiment, artifact_location=(ROOT / "mlartifacts").as_uri() if own_store else None
            )
        except MlflowException as error:  # a concurrent run created it first
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def process_id(process: psutil.Process | None = None) -> str:
    """An id of `process` (by default this one), unique across time and hosts."""
    process = process or psutil.Process()
    return f"{socket.gethostname()}:{process.pid}:{process.create_time():.3f}"


def process_gone(identity: str) -> bool:
    """Whether the process of a `process_id` has exited. One of another host cannot be checked from
    here, so it counts as alive."""
    host, pid, started = identity.rsplit(":", 2)
    if host != socket.gethostname():
        return False
    try:
        process = psutil.Process(int(pid))
        return process.status() == psutil.STATUS_ZOMBIE or f"{process.create_time():.3f}" != started
    except psutil.NoSuchProcess:
        return True


def _dvc_process() -> psutil.Process | None:
    """The nearest `dvc` ancestor process, or None."""
    for process in psutil.Process().parents():
        try:
            command = process.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if any(Path(part).name == "dvc" for part in command[:2]):
            return process
    return None


def end_abandoned_runs(experiment_id: str) -> None:
    """End the runs left RUNNING by a process that is gone: a `dvc repro` parent as its stages ended
    (once none runs any more), any other as KILLED, since its process died before it could end it."""
    client = MlflowClient()
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    abandoned = [run for run in running if PROCESS_TAG in run.data.tags and process_gone(run.data.tags[PROCESS_TAG])]
    # Stages before parents: a parent's status is decided by its stages'.
    for run in sorted(abandoned, key=lambda run: INVOCATION_TAG in run.data.tags):
        if INVOCATION_TAG not in run.data.tags:
            client.set_terminated(run.info.run_id, "KILLED")
            continue
        stages = {
            stage.info.status
            for stage in client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}'")
        }
        if "RUNNING" in stages:  # a stage outlived its dvc process: it ends the parent itself (stage_run)
            continue
        # No stage at all: dvc was killed before its first stage had started a run.
        status = "KILLED" if not stages or "KILLED" in stages else "FAILED" if "FAILED" in stages else "FINISHED"
        client.set_terminated(run.info.run_id, status)


def close_parent_when_done(parent_id: str) -> None:
    """End the `dvc repro` parent run `parent_id` once its dvc process and every stage it started
    have exited (the watcher's work)."""
    client = MlflowClient()
    parent = client.get_run(parent_id)
    while not process_gone(parent.data.tags[PROCESS_TAG]):
        time.sleep(1)
    while client.get_run(parent_id).info.status == "RUNNING":
        end_abandoned_runs(parent.info.experiment_id)
        time.sleep(1)


def parent_run(experiment_id: str, stage: str) -> tuple[str, bool]:
    """The id of the stage's parent run, and whether the stage itself must end it (run by hand)."""
    if os.environ.get(PARENT_RUN_ENV):
        return os.environ[PARENT_RUN_ENV], False
    client = MlflowClient()
    dvc = _dvc_process()
    if dvc is None:
        by_hand = client.create_run(experiment_id, run_name=f"{stage} (by hand)", tags={PROCESS_TAG: process_id()})
        return by_hand.info.run_id, True
    invocation = process_id(dvc)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}'", max_results=1)
    if found:
        return found[0].info.run_id, False
    parent = client.create_run(
        experiment_id, run_name="dvc repro", tags={INVOCATION_TAG: invocation, PROCESS_TAG: invocation}
    ).info.run_id
    subprocess.Popen(
        [sys.executable, "-m", "stages.tracking", parent],
        cwd=ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives the stage, and a Ctrl-C or kill of the dvc process group
    )
    return parent, False


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class RunRecord:
    """The id of a stage's MLflow run, as part of its resume state."""

    def __init__(self):
        self.run_id: str | None = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state["run_id"]

    def reopenable(self, experiment_id: str) -> bool:
        """Whether the run is still there to reopen: the store or the experiment may have changed."""
        try:
            run = MlflowClient().get_run(self.run_id) if self.run_id else None
        except MlflowException:
            return False
        return run is not None and run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"


@contextmanager
def stage_run(
    stage: str, params: dict, experiment: str, resume: ResumeState | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A nested MLflow run for `stage` under the pipeline run's parent, with `params` logged; with
    `resume`, the run a resumed stage started before, reopened under the current parent. Under
    torchrun rank 0 alone has a run (the others get None), so a stage logs once."""
    if not is_main():
        yield None
        return
    experiment_id = configure(experiment)
    end_abandoned_runs(experiment_id)
    parent, ends_parent = parent_run(experiment_id, stage)
    record = RunRecord()
    if resume:
        resume.attach(mlflow_run=record)
    reopened = record.reopenable(experiment_id)
    tags = {STAGE_TAG: stage, PROCESS_TAG: process_id(), MLFLOW_PARENT_RUN_ID: parent}
    run = mlflow.start_run(run_id=record.run_id if reopened else None, run_name=stage, tags=tags)
    record.run_id = run.info.run_id
    status = "FAILED"
    try:
        if not reopened:
            mlflow.log_params(flatten(params))
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        # The parent ends here if it is this stage's own, or if its process is gone (a `dvc repro`
        # killed while this stage ran on): that pipeline run was killed, however this stage ends. It
        # is ended before this run, so a watcher never finds it without a running stage and
        # takes it for finished.
        client = MlflowClient()
        owner = client.get_run(parent).data.tags.get(PROCESS_TAG)
        if ends_parent or (owner and process_gone(owner)):
            client.set_terminated(parent, status if ends_parent else "KILLED")
        mlflow.end_run(status)


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

    def state_dict(self) -> dict:
        """The rows so far, for the resume state. What was logged to MLflow is flushed to the store
        first: a resumed stage's run then holds every step up to the saved one."""
        mlflow.flush_async_logging()
        return {"rows": list(self.rows), "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.pending = list(state["rows"]), state["pending"]

    def write(self) -> None:
        """Record the last step if it fell between two intervals, then write the CSV."""
        if self.pending:
            self._record()
        with atomic_path(self.csv_path) as tmp:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]) if self.rows else ["step"])
                writer.writeheader()
                writer.writerows(self.rows)


if __name__ == "__main__":
    close_parent_when_done(sys.argv[1])
