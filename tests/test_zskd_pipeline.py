"""Switching the synthesis method is one override: `dvc exp run -S synthesize.method=zskd`."""

import json
import shutil

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import BIN, run
from dfkd.classifier import load_classifier
from dfkd.synthesis.methods import load_transfer_set
from dfkd.synthesis.zskd import ImpressionTransferSet

RERUN = {"synthesize", "distill", "baseline_noise", "baseline_real", "export", "evaluate"}


@pytest.fixture(scope="module")
def switched(tiny_project, tmp_path_factory):
    """A copy of the tiny DAFL project after `dvc exp run -S synthesize.method=zskd`, and its output."""
    root = tmp_path_factory.mktemp("zskd") / "project"
    shutil.copytree(tiny_project, root, symlinks=True)
    teacher = (root / "models/teacher.pt").read_bytes()
    output = run([str(BIN / "dvc"), "exp", "run", "-S", "synthesize.method=zskd"], root).stdout
    return root, output, teacher


def test_only_synthesis_and_what_follows_it_rerun(switched):
    root, output, teacher = switched
    ran = {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}
    assert ran == RERUN
    assert (root / "models/teacher.pt").read_bytes() == teacher
    metrics = json.loads((root / "metrics.json").read_text())
    assert 0 <= metrics["student"]["accuracy"] <= 1


def test_the_transfer_set_is_the_impressions_with_their_figures(switched):
    root, _, _ = switched
    teacher_spec = load_classifier(root / "models/teacher.pt").spec
    impressions = load_transfer_set(root / "models/transfer_set.pt", torch.device("cpu"), teacher_spec)
    assert isinstance(impressions, ImpressionTransferSet)
    assert impressions.images.shape == (40, 1, 32, 32) and impressions.targets.shape == (40, 10)
    for figure in ("method/class_similarity.png", "method/impressions.png", "samples.png", "losses.png"):
        assert (root / "reports/synthesize" / figure).read_bytes().startswith(b"\x89PNG"), figure


def test_the_students_and_both_baselines_use_the_zskd_recipe(switched):
    root, _, _ = switched
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("data-free-distillation")
    latest = {}
    for found in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        if "dfkd.stage" in found.data.tags:
            latest[found.data.tags["dfkd.stage"]] = found
    assert latest["synthesize"].data.params["method"] == "zskd"
    assert latest["synthesize"].data.params["zskd.impressions"] == "40"
    artifacts = {a.path for a in client.list_artifacts(latest["synthesize"].info.run_id, "reports/method")}
    assert artifacts == {"reports/method/class_similarity.png", "reports/method/impressions.png"}
    for stage in ("distill", "baseline_noise", "baseline_real"):
        logged = latest[stage].data.params
        assert (logged["recipe"], logged["temperature"], logged["pool_size"]) == ("zskd", "20.0", "0"), stage
