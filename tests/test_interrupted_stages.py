"""Stages killed or failed midway, for real: a rerun resumes only what is still valid, always
completes, keeps whole curves, and MLflow says what happened to every run."""

import copy
import csv
import os
import signal
import subprocess
import sys

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import BIN, TINY_PARAMS, copy_project, environment, merge, run, set_params, wait_for
from dfkd.classifier import load_classifier
from stages.tracking import INVOCATION_TAG, STAGE_TAG

# The stage saves its resume state every 200 steps: a kill at the first save leaves 40 steps and the
# outputs to go.
DISTILL = {"batch_size": 16, "dafl": {"steps": 240}}
DVC = str(BIN / "dvc")
DVC_DISTILL = [DVC, "repro", "--force", "--single-item", "distill"]
BY_HAND_DISTILL = [sys.executable, "-m", "stages.distill"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project up to the transfer set, its distillation long enough to be killed midway."""
    params = merge(copy.deepcopy(TINY_PARAMS), {"train_teacher": {"epochs": 1}, "distill": DISTILL})
    root = copy_project(tmp_path_factory.mktemp("interrupted"), params)
    run([DVC, "repro", "synthesize"], root)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return root


def kill_distill_at_first_save(
    project, command: list[str], whole_group: bool = True, signal_number: int = signal.SIGKILL
) -> subprocess.CompletedProcess:
    """Start `command` (distill, by DVC or by hand) and send it `signal_number` once the stage has saved
    its resume state: the whole process group, or the first process alone (a dvc process killed in a
    terminal); return how it ended."""
    (project / ".resume/distill.pt").unlink(missing_ok=True)
    # A test run started in the background by a script ignores SIGINT, and its children would inherit
    # that: the stage is started as from a terminal, where Ctrl-C reaches it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            command, cwd=project, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    wait_for(lambda: (project / ".resume/distill.pt").exists() or process.poll() is not None)
    assert process.poll() is None, "distill ended before its first resume state"
    (os.killpg if whole_group else os.kill)(process.pid, signal_number)
    _, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, None, stderr)


def curve_steps(project) -> list[int]:
    with open(project / "reports/distill/curve.csv") as handle:
        return [int(float(row["step"])) for row in csv.DictReader(handle)]


def runs(filter_string: str = "") -> list:
    """This experiment's runs matching `filter_string`, newest first."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("data-free-distillation")
    return client.search_runs([experiment.experiment_id], filter_string, order_by=["attributes.start_time DESC"])


def latest_parent(by_hand: bool = False):
    return runs("attributes.run_name = 'distill (by hand)'" if by_hand else f"tags.`{INVOCATION_TAG}` != ''")[0]


def stages_of(parent) -> dict:
    return {run.data.tags[STAGE_TAG]: run for run in runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}


def status(run) -> str:
    return MlflowClient().get_run(run.info.run_id).info.status


def ended(run) -> bool:
    return status(run) != "RUNNING"


def test_resume_state_of_other_inputs_is_not_used(project):
    kill_distill_at_first_save(project, DVC_DISTILL)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["synthesize"]["dafl"].update(lr=0.01, steps=8)  # a new transfer set, as in the issue
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = run([DVC, "repro", "distill"], project).stdout
    assert "distill: .resume/distill.pt was saved for other inputs (models/transfer_set.pt); starting from step 0" in rerun
    assert "resuming" not in rerun
    assert curve_steps(project) == list(range(5, 241, 5))
    # Its parent ends once dvc has exited, FINISHED with both its stages.
    parent = latest_parent()
    wait_for(lambda: ended(parent))
    assert status(parent) == "FINISHED"
    assert {stage: run.info.status for stage, run in stages_of(parent).items()} == {
        "synthesize": "FINISHED", "distill": "FINISHED"
    }


def test_state_saved_at_the_last_step_leads_to_a_completed_stage(tmp_path):
    # train_teacher saves its state every epoch; its checkpoint cannot be written (a directory in
    # its place, as a read-only or full disk would refuse it), so the run fails after its last epoch.
    project = copy_project(tmp_path, merge(copy.deepcopy(TINY_PARAMS), {"train_teacher": {"epochs": 1}}))
    run([DVC, "repro", "prepare"], project)
    (project / "models/teacher.pt").mkdir(parents=True)
    failed = run([sys.executable, "-m", "stages.train_teacher"], project, check=False)
    assert failed.returncode != 0 and (project / ".resume/train_teacher.pt").exists()
    (project / "models/teacher.pt").rmdir()
    rerun = run([sys.executable, "-m", "stages.train_teacher"], project).stdout
    assert "train_teacher: resuming from step 1 of 1 (.resume/train_teacher.pt)" in rerun
    assert load_classifier(project / "models/teacher.pt").spec.num_classes == 10
    with open(project / "reports/train_teacher/curve.csv") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1]
    assert not (project / ".resume/train_teacher.pt").exists()


def test_resumed_stage_keeps_its_whole_curve_and_mlflow_run(project):
    kill_distill_at_first_save(project, BY_HAND_DISTILL)
    killed_parent = latest_parent(by_hand=True)
    killed = stages_of(killed_parent)["distill"]
    rerun = run(BY_HAND_DISTILL, project).stdout
    assert "distill: resuming from step 200 of 240 (.resume/distill.pt)" in rerun
    assert curve_steps(project) == list(range(5, 241, 5)), "the CSV covers every step"
    resumed = stages_of(latest_parent(by_hand=True))["distill"]
    assert resumed.info.run_id == killed.info.run_id, "the same MLflow run, now under the rerun's parent"
    assert resumed.info.status == "FINISHED"
    history = MlflowClient().get_metric_history(resumed.info.run_id, "kd_loss")
    assert {metric.step for metric in history} == set(range(5, 241, 5))
    assert status(killed_parent) == "KILLED", "ended by the next start"


def test_killed_runs_end_as_killed(project):
    # The whole dvc process group killed: nothing in it could end a run; the parent's watcher does.
    kill_distill_at_first_save(project, DVC_DISTILL)
    parent = latest_parent()
    wait_for(lambda: ended(parent))
    assert status(parent) == "KILLED" and stages_of(parent)["distill"].info.status == "KILLED"

    # dvc alone killed: its stage finishes on its own, but the pipeline run was still killed.
    kill_distill_at_first_save(project, DVC_DISTILL, whole_group=False)
    parent = latest_parent()
    wait_for(lambda: not (project / ".resume/distill.pt").exists())  # the orphaned stage is done
    wait_for(lambda: ended(parent))
    assert status(parent) == "KILLED" and stages_of(parent)["distill"].info.status == "FINISHED"


def test_ctrl_c_ends_a_stage_with_one_line_and_keeps_its_resume_state(project):
    # Thousands of steps still to go at the first save, so the Ctrl-C always lands mid-training.
    params = (project / "params.yaml").read_text()
    set_params(project, {"distill": {"dafl": {"steps": 5000}}})
    try:
        interrupted = kill_distill_at_first_save(project, BY_HAND_DISTILL, signal_number=signal.SIGINT)
    finally:
        (project / "params.yaml").write_text(params)
    assert interrupted.returncode == 130 and "Traceback" not in interrupted.stderr
    assert interrupted.stderr.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
    assert (project / ".resume/distill.pt").exists()
    assert status(stages_of(latest_parent(by_hand=True))["distill"]) == "KILLED"
