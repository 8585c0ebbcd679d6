import json

import onnx
import pytest
import torch

from dfkd.export import INPUT_NAME, ParityError, check_parity, export_onnx, onnx_logits, onnx_session
from dfkd.inputs import ONNX_METADATA_KEY, InputSpec
from dfkd.zoo.lenet import LeNet5

MNIST = InputSpec(channels=1, size=32, mean=(0.1307,), std=(0.3081,), class_names=tuple("0123456789"), resize="pad")


def half_lenet(channels: int = 1) -> LeNet5:
    return LeNet5(channels=channels, image_size=32, num_classes=10, width=0.5).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = half_lenet()
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    export_onnx(model, MNIST, path, opset=18, metadata={"run_id": "abc"})
    return model, path


def test_exported_file_passes_the_checker_with_pinned_opset_and_metadata(exported):
    _, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {entry.domain: entry.version for entry in proto.opset_import}[""] == 18
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert ONNX_METADATA_KEY == "input_spec" and metadata["run_id"] == "abc"
    assert metadata[ONNX_METADATA_KEY] == MNIST.model_dump_json()
    assert InputSpec.model_validate_json(metadata[ONNX_METADATA_KEY]) == MNIST
    described = json.loads(metadata[ONNX_METADATA_KEY])  # what a server in any language reads
    assert described["mean"] == [0.1307] and described["size"] == 32 and described["resize"] == "pad"
    assert described["class_names"] == list("0123456789")


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
    other = half_lenet()  # different weights than the exported file
    with pytest.raises(ParityError, match="ONNX parity failed on 256 inputs"):
        check_parity(other, path, torch.randn(256, 1, 32, 32), max_abs_diff=1e-4)


def test_the_input_shape_is_the_specs(tmp_path):
    torch.manual_seed(0)
    spec = InputSpec(channels=3, size=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), class_names=tuple("abcdefghij"))
    model = half_lenet(channels=3)
    export_onnx(model, spec, tmp_path / "rgb.onnx", opset=18)
    proto = onnx.load(str(tmp_path / "rgb.onnx"))
    (image,) = [value for value in proto.graph.input if value.name == INPUT_NAME]
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [dim.dim_value for dim in dims[1:]] == [3, 32, 32]  # a named, dynamic batch
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert InputSpec.model_validate_json(metadata[ONNX_METADATA_KEY]) == spec
    images = torch.randn(5, 3, 32, 32)
    assert torch.allclose(torch.from_numpy(onnx_logits(onnx_session(tmp_path / "rgb.onnx"), images)), model(images), atol=1e-4)
