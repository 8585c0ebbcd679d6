"""Evaluation figures: accuracy, agreement, confusion, model size, FLOPs and ONNX latency."""

import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dfkd.export import INPUT_NAME, OUTPUT_NAME


def confusion_matrix(predicted: np.ndarray, actual: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = actual class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (actual, predicted), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> list[float]:
    totals = matrix.sum(axis=1)
    return [float(matrix[k, k] / totals[k]) if totals[k] else float("nan") for k in range(len(matrix))]


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass on one image (a multiply-add counts as two)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.cpu().eval()(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


def file_size(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size


def onnx_latency_ms(
    session: ort.InferenceSession, input_shape: tuple[int, ...], batch_size: int, repeats: int
) -> dict[str, float]:
    """Median and 95th-percentile wall time of one `session.run` on a batch, after a warm-up."""
    batch = np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)
    for _ in range(5):
        session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        timings.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.median(timings)), "p95_ms": float(np.percentile(timings, 95))}
