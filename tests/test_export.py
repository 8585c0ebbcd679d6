import onnx
import pytest
import torch

from dfkd.export import ParityError, check_parity, export_onnx, onnx_logits, onnx_session
from dfkd.models import ArchitectureConfig, LeNet5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = LeNet5(ArchitectureConfig(width=0.5)).eval()
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    export_onnx(model, path, opset=18, metadata={"class_names": "[]"})
    return model, path


def test_exported_file_passes_the_checker_with_pinned_opset_and_metadata(exported):
    _, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {entry.domain: entry.version for entry in proto.opset_import}[""] == 18
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert metadata["pixel_mean"] == "0.1307" and metadata["input_size"] == "32"


def test_batch_axis_is_dynamic(exported):
    model, path = exported
    session = onnx_session(path)
    for batch in (1, 7, 300):
        images = torch.randn(batch, 1, 32, 32)
        logits = onnx_logits(session, images)
        assert logits.shape == (batch, 10)
        assert torch.allclose(torch.from_numpy(logits), model(images), atol=1e-4)


def test_parity_on_256_inputs(exported):
    model, path = exported
    report = check_parity(model, path, torch.randn(256, 1, 32, 32), max_abs_diff=1e-4)
    assert report["samples"] == 256 and report["argmax_mismatches"] == 0 and report["max_abs_diff"] < 1e-4


def test_parity_failure_is_detected(exported):
    _, path = exported
    other = LeNet5(ArchitectureConfig(width=0.5)).eval()  # different weights than the exported file
    with pytest.raises(ParityError, match="ONNX parity failed on 256 inputs"):
        check_parity(other, path, torch.randn(256, 1, 32, 32), max_abs_diff=1e-4)
