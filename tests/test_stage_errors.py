"""Bad input stops a stage at once, with exit code 2 and a message naming the key or file."""

import sys
import time

import pytest
import yaml

from conftest import copy_project, run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("errors"), {})


def set_params(project, update):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in update.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(project, stage):
    start = time.perf_counter()
    result = run([sys.executable, "-m", f"stages.{stage}"], project, check=False, MLFLOW_TRACKING_URI="sqlite:///unused.db")
    return result, time.perf_counter() - start


def test_invalid_param_names_the_key_before_training(project):
    original = (project / "params.yaml").read_text()
    set_params(project, {"train_teacher": {"lr": -0.5, "epochs": 1000}})
    try:
        result, seconds = run_stage(project, "train_teacher")
    finally:
        (project / "params.yaml").write_text(original)
    assert result.returncode == 2
    assert "train_teacher.lr: Input should be greater than 0 (got -0.5)" in result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 30  # 1000 epochs never started


def test_missing_idx_directory_is_named(project):
    original = (project / "params.yaml").read_text()
    set_params(project, {"prepare": {"source": "idx", "idx_dir": "data/my-mnist"}})
    try:
        result, _ = run_stage(project, "prepare")
    finally:
        (project / "params.yaml").write_text(original)
    assert result.returncode == 2
    assert "data/my-mnist: data directory does not exist" in result.stderr


def test_missing_split_and_corrupted_checkpoint_are_named(project):
    result, _ = run_stage(project, "train_teacher")
    assert result.returncode == 2 and "train.npz: split file does not exist" in result.stderr
    (project / "models").mkdir(exist_ok=True)
    (project / "models/teacher.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    result, _ = run_stage(project, "synthesize")
    assert result.returncode == 2 and "models/teacher.pt: corrupted or not a checkpoint" in result.stderr
    assert not (project / "models/transfer_set.pt").exists()
