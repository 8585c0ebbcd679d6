"""The quality gate: the pure check, then the real MLflow registry on SQLite with two versions."""

import hashlib
import json

import mlflow
import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient

from pipeline.promote import GATE_TAG, REASONS_TAG, PromotionError, gate_failures, promote
from stages.export import ONNX_SHA256_TAG
from stages.params import PromoteParams, validate_params

THRESHOLDS = PromoteParams(min_accuracy=0.9, max_gap_to_teacher=0.05, alias="champion")
PARITY_OK = {"samples": 256, "max_abs_diff": 2e-6, "argmax_mismatches": 0}


def metrics(teacher: float, student_onnx: float) -> dict:
    return {"teacher": {"accuracy": teacher}, "student": {"accuracy": student_onnx, "onnx_accuracy": student_onnx}}


def test_a_student_within_every_threshold_passes():
    assert gate_failures(metrics(0.97, 0.94), PARITY_OK, THRESHOLDS, 1e-4) == []
    assert gate_failures(metrics(0.95, 0.90), PARITY_OK, THRESHOLDS, 1e-4) == []  # both limits are inclusive


@pytest.mark.parametrize(
    "scores, parity, expected",
    [
        ((0.92, 0.89), PARITY_OK, ["ONNX student accuracy 89.00% is below promote.min_accuracy 90.00%"]),
        ((0.99, 0.93), PARITY_OK, ["gap to the teacher 6.00 pt is above promote.max_gap_to_teacher 5.00 pt"]),
        ((0.97, 0.95), {**PARITY_OK, "max_abs_diff": 3e-4}, ["ONNX parity: max |logit difference| 0.0003"]),
        ((0.97, 0.95), {**PARITY_OK, "argmax_mismatches": 2}, ["2 argmax mismatches"]),
        ((0.99, 0.50), PARITY_OK, ["below promote.min_accuracy", "above promote.max_gap_to_teacher"]),
    ],
)
def test_each_failed_threshold_is_named(scores, parity, expected):
    failures = gate_failures(metrics(*scores), parity, THRESHOLDS, 1e-4)
    assert len(failures) == len(expected)
    for failure, fragment in zip(failures, expected):
        assert fragment in failure


def test_the_serving_alias_must_differ_from_the_export_alias():
    with pytest.raises(ValueError, match="promote.alias must differ from mlflow.alias"):
        validate_params({"promote": {"alias": "candidate"}})
    with pytest.raises(ValueError, match="promote.min_accuracy: Input should be less than or equal to 1"):
        validate_params({"promote": {"min_accuracy": 1.5}})


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A real SQLite registry and experiment, and a project layout (models/, reports/) in tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.create_experiment("promote-test", artifact_location=(tmp_path / "artifacts").as_uri())
    (tmp_path / "models").mkdir()
    (tmp_path / "reports").mkdir()
    return tmp_path


def promote_in(root, params):
    return promote(params, root / "metrics.json", root / "reports" / "parity.json", root / "models" / "student.onnx")


def export_version(root, params, bias: float, scores: tuple[float, float]) -> str:
    """What the export and evaluate stages leave behind: a registered ONNX version @candidate, tagged
    with its file's hash, plus metrics.json and parity.json."""
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Add", ["image", "bias"], ["logits"])],
            "tiny",
            [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [None, 2])],
            [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 2])],
            [onnx.numpy_helper.from_array(np.full(2, bias, np.float32), "bias")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    onnx.save_model(model, str(root / "models" / "student.onnx"))
    mlflow.set_experiment("promote-test")
    with mlflow.start_run():
        info = mlflow.onnx.log_model(
            model, name="student", registered_model_name=params.mlflow.registered_model, pip_requirements=["onnxruntime"]
        )
    client = MlflowClient()
    version = info.registered_model_version
    client.set_registered_model_alias(params.mlflow.registered_model, params.mlflow.alias, version)
    digest = hashlib.sha256((root / "models" / "student.onnx").read_bytes()).hexdigest()
    client.set_model_version_tag(params.mlflow.registered_model, version, ONNX_SHA256_TAG, digest)
    (root / "metrics.json").write_text(json.dumps(metrics(*scores)))
    (root / "reports" / "parity.json").write_text(json.dumps(PARITY_OK))
    return str(version)


def test_a_passing_version_becomes_champion_and_a_failing_one_leaves_it(registry):
    params = validate_params({"mlflow": {"experiment": "promote-test"}})
    client = MlflowClient()
    name = params.mlflow.registered_model

    first = export_version(registry, params, bias=0.0, scores=(0.97, 0.95))
    promotion = promote_in(registry, params)
    assert promotion.promoted and promotion.serving_version == first
    assert str(client.get_model_version_by_alias(name, "champion").version) == first
    assert client.get_model_version(name, first).tags[GATE_TAG] == "passed"

    second = export_version(registry, params, bias=1.0, scores=(0.97, 0.80))
    promotion = promote_in(registry, params)
    assert not promotion.promoted and promotion.version == second and promotion.serving_version == first
    assert str(client.get_model_version_by_alias(name, "champion").version) == first, "the alias stays"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == second, "the failed student is kept"
    tags = client.get_model_version(name, second).tags
    assert tags[GATE_TAG] == "failed" and "below promote.min_accuracy" in tags[REASONS_TAG]
    assert f"stays on v{first}" in promotion.report() and "below promote.min_accuracy" in promotion.report()


def test_the_gate_follows_the_file_on_disk_when_dvc_restored_an_earlier_export(registry):
    """`dvc exp run -S synthesize.method=zskd`, then back to dafl: DVC restores the first student's files
    from its run-cache without running the export, and @candidate still names the second version."""
    params = validate_params({"mlflow": {"experiment": "promote-test"}})
    client = MlflowClient()
    name = params.mlflow.registered_model
    first = export_version(registry, params, bias=0.0, scores=(0.97, 0.95))
    restored = (registry / "models" / "student.onnx").read_bytes()
    export_version(registry, params, bias=1.0, scores=(0.97, 0.80))
    (registry / "models" / "student.onnx").write_bytes(restored)
    (registry / "metrics.json").write_text(json.dumps(metrics(0.97, 0.95)))

    promotion = promote_in(registry, params)
    assert promotion.promoted and promotion.version == first and promotion.serving_version == first
    assert str(client.get_model_version_by_alias(name, "candidate").version) == first


def test_nothing_to_gate_is_an_error_naming_what_to_run(registry):
    params = validate_params({"mlflow": {"experiment": "promote-test"}})
    with pytest.raises(PromotionError, match="student.onnx: does not exist; run the pipeline"):
        promote_in(registry, params)
    export_version(registry, params, bias=0.0, scores=(0.97, 0.95))
    (registry / "metrics.json").unlink()
    with pytest.raises(PromotionError, match="metrics.json: does not exist; run the pipeline"):
        promote_in(registry, params)
    (registry / "models" / "student.onnx").write_bytes(b"another file")  # never exported
    with pytest.raises(PromotionError, match="no version of 'dfkd-student' .* is this file .*dvc repro --force export"):
        promote_in(registry, params)
    assert "champion" not in MlflowClient().get_registered_model("dfkd-student").aliases
