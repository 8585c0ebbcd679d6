"""Bad input stops a stage at once, and a diverging loss at its first step, with exit code 2 and a
message naming the key, file or step."""

import sys
import time

import pytest
import torch

from conftest import BIN, PROJECT as PROJECT_ROOT, TINY_PARAMS, copy_project, run, set_params
from dfkd.checkpoint import save_checkpoint
from dfkd.classifier import build_classifier, save_classifier
from dfkd.inputs import InputSpec


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("errors"), {})


MNIST = InputSpec(channels=1, size=32, mean=(0.1307,), std=(0.3081,), class_names=tuple("0123456789"), resize="pad")

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
    set_params(project, {"prepare": {"source": "idx", "data_dir": "data/my-mnist"}})
    try:
        result, _ = run_stage(project, "prepare")
    finally:
        (project / "params.yaml").write_text(original)
    assert result.returncode == 2
    assert "data/my-mnist: data directory does not exist" in result.stderr


def test_missing_split_and_corrupted_checkpoint_are_named(project):
    result, _ = run_stage(project, "train_teacher")
    assert result.returncode == 2 and "dataset.json: does not exist (run the prepare stage first)" in result.stderr
    (project / "models").mkdir(exist_ok=True)
    (project / "models/teacher.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    result, _ = run_stage(project, "synthesize")
    assert result.returncode == 2 and "models/teacher.pt: corrupted or not a checkpoint" in result.stderr
    assert not (project / "models/transfer_set.pt").exists()


def write_classifiers(project, *names):
    for name in names:
        save_classifier(project / "models" / name, build_classifier("lenet5", {}, MNIST))


def test_a_corrupt_onnx_file_is_named_by_evaluate(project):
    write_classifiers(project, "teacher.pt", "student.pt", "student_noise.pt", "student_real.pt")
    (project / "models/student.onnx").write_bytes(b"\x08\x07 not a protobuf of a model")
    result, _ = run_stage(project, "evaluate")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "models/student.onnx: not a loadable ONNX model" in result.stderr


def test_a_transfer_set_of_the_wrong_shape_is_named_by_distill(project):
    write_classifiers(project, "teacher.pt")
    impressions = {name: torch.zeros(4, 10) for name in ("targets", "classes", "scales", "similarity")}
    payload = {"kind": "transfer_set", "method": "zskd", "input": MNIST.model_dump(), **impressions, "images": [[0.0] * 4],
               "metadata": {}}
    save_checkpoint(project / "models/transfer_set.pt", payload)
    result = run([sys.executable, "-m", "stages.distill", "--source", "synthetic"], project, check=False,
                 MLFLOW_TRACKING_URI="sqlite:///unused.db")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "transfer_set.pt: zskd transfer set does not match its architecture (images should be tensors, got list)" in result.stderr


def test_the_gate_with_nothing_registered_says_so_with_exit_code_2(project, tmp_path):
    (project / "models").mkdir(exist_ok=True)
    (project / "models/student.onnx").write_text("an export the registry never saw")
    result = run([sys.executable, "-m", "pipeline.promote"], project, check=False,
                 MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'empty.db'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no version of 'dfkd-student'" in result.stderr and "dvc repro --force export" in result.stderr


def test_a_diverging_learning_rate_stops_dvc_repro_naming_the_step_and_leaves_no_output(tmp_path):
    root = copy_project(tmp_path, TINY_PARAMS)
    dvc_repro = [str(BIN / "dvc"), "repro", "distill"]
    run(dvc_repro, root)
    assert (root / "models/student.pt").is_file()

    set_params(root, {"distill": {"lr": 1e30}})
    result = run(dvc_repro, root, check=False)
    assert result.returncode != 0
    assert "error: distill diverged at step 2: kd_loss = nan" in result.stderr
    assert not (root / "models/student.pt").exists(), "the student of the earlier run is not taken for this one"
    assert (root / "models/transfer_set.pt").is_file()

    set_params(root, {"synthesize": {"dafl": {"lr": 1e30}}})
    result = run(dvc_repro, root, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: generator diverged at step 2: loss = nan" in result.stderr
    assert not (root / "models/transfer_set.pt").exists()


WRITE_LIMITED = """
import resource, signal, sys
from dfkd.checkpoint import OutputError
from dfkd.classifier import build_classifier, save_classifier
from dfkd.inputs import InputSpec
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
try:
    spec = InputSpec(channels=1, size=32, mean=(0.1307,), std=(0.3081,), class_names=tuple("0123456789"))
    save_classifier(sys.argv[1], build_classifier("lenet5", {}, spec))
except OutputError as error:
    print(error)
"""


def test_a_full_disk_names_the_output_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "models" / "teacher.pt"
    result = run([sys.executable, "-c", WRITE_LIMITED, str(target)], PROJECT_ROOT)
    assert result.stdout.startswith(f"{target}: cannot be written")
    assert list(tmp_path.rglob("*")) == [target.parent], "neither the checkpoint nor its temporary file is left"
