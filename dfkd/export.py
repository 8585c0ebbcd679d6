"""ONNX export of a classifier and the parity check against PyTorch."""

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from torch import nn

from dfkd.checkpoint import CheckpointError, atomic_path
from dfkd.inputs import ONNX_METADATA_KEY, InputSpec

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# The exporter warns, at every first export, of each torchvision op it cannot register without torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class ParityError(RuntimeError):
    """The ONNX file does not compute what the PyTorch model computes."""


def export_onnx(
    model: nn.Module, spec: InputSpec, path: str | os.PathLike, opset: int, metadata: dict[str, str] | None = None
) -> None:
    """Write `model` as ONNX with a dynamic batch axis, check it with `onnx.checker`, then move it
    into place. The input description travels in the file's metadata, for whoever serves it."""
    model = model.cpu().eval()
    example = torch.zeros(2, *spec.shape)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's chatter about its own internals
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    properties = {ONNX_METADATA_KEY: spec.model_dump_json(), **(metadata or {})}
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)


def onnx_session(path: str | os.PathLike, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
    try:
        return ort.InferenceSession(str(Path(path)), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's InvalidProtobuf, NoSuchFile, Fail... share no base class of ours
        raise CheckpointError(f"{path}: not a loadable ONNX model ({type(error).__name__}: {error})") from error


def onnx_logits(session: ort.InferenceSession, images: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    chunks = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size].numpy()})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks)


def check_parity(model: nn.Module, onnx_path: str | os.PathLike, inputs: torch.Tensor, max_abs_diff: float) -> dict:
    """Compare PyTorch and onnxruntime logits on `inputs`; raise ParityError past the tolerance or on
    any differing argmax, else return the figures."""
    with torch.no_grad():
        expected = model.cpu().eval()(inputs).numpy()
    actual = onnx_logits(onnx_session(onnx_path), inputs)
    report = {
        "samples": len(inputs),
        "max_abs_diff": float(np.abs(actual - expected).max()),
        "argmax_mismatches": int((actual.argmax(1) != expected.argmax(1)).sum()),
    }
    if report["max_abs_diff"] > max_abs_diff or report["argmax_mismatches"]:
        raise ParityError(
            f"ONNX parity failed on {report['samples']} inputs: max |logit difference| "
            f"{report['max_abs_diff']:.3g} (limit {max_abs_diff:g}), {report['argmax_mismatches']} argmax mismatches"
        )
    return report
