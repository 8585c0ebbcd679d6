"""A teacher the user brings, on RGB data of their own, through the real `dvc repro`, to a served student.

Each form of teacher (a state dict of a zoo architecture; a `torch.export` file of a network defined
only here, both with batch norm) is distilled with DAFL, then ZSKD, then DeepInversion from an RGB
image folder written here, into a ResNet-8 student exported to ONNX, which the real server answers an
RGB PNG upload with.
"""

import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import BIN, TINY_PARAMS, copy_project, environment, merge, run, set_params
from dfkd.inputs import InputSpec
from dfkd.synthesis.deepinversion import InversionTransferSet
from dfkd.synthesis.dfad import AdversarialGenerator
from dfkd.synthesis.fast_dfkd import MetaGeneratorPool
from dfkd.synthesis.methods import load_transfer_set
from dfkd.zoo import ModelConfig, build_model

CLASSES = ("red", "green", "blue")
SIDE = 16
SPEC = InputSpec(channels=3, size=SIDE, mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3), class_names=CLASSES)


class OwnNetwork(nn.Module):
    """A network of the user's own design: the pipeline has no class for it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.head = nn.Linear(32, len(CLASSES))

    def forward(self, x):
        return self.head(self.body(x))


def write_image_folder(root) -> None:
    """Noisy images whose colour is their class, at two sizes (the reader resizes them)."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for k in range(30):
            side = 20 if k % 2 else SIDE
            pixels = rng.integers(0, 80, (side, side, 3))
            pixels[..., index] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{k}.png")


def write_teacher(form: str, folder) -> dict:
    """The teacher file of `form`, and the params.yaml `teacher` section that brings it."""
    torch.manual_seed(0)
    if form == "state_dict":
        model = build_model(ModelConfig(architecture="resnet8", options={"width": 0.5}), 3, SIDE, len(CLASSES))
        torch.save(model.state_dict(), folder / "resnet8.pt")
        return {"architecture": "resnet8", "options": {"width": 0.5}, "checkpoint": "teachers/resnet8.pt"}
    network = OwnNetwork().eval()
    program = torch.export.export(network, (torch.zeros(2, *SPEC.shape),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "mine.pt2")
    return {"checkpoint": "teachers/mine.pt2"}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def serve_and_predict(root, image: bytes) -> dict:
    port = 18000 + int(time.time() * 1000) % 1000
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model", str(root / "models/student.onnx"), "--port", str(port)],
        cwd=root, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.poll() else "no start"
                time.sleep(0.2)
            return http.post("/predict", files={"image": ("red.png", image, "image/png")}).json()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("form", ["state_dict", "torch_export"])
def test_an_own_teacher_on_rgb_data_is_distilled_with_each_method_and_served(tmp_path, form):
    data = tmp_path / "images"
    write_image_folder(data)
    params = merge(json.loads(json.dumps(TINY_PARAMS)), {
        "prepare": {"source": "image_folder", "data_dir": str(data)},
        "teacher": {"source": "checkpoint", "image_size": SIDE, "input": SPEC.model_dump(mode="json")},
        "distill": {"student": {"architecture": "resnet8", "options": {"width": 0.25}}},
        "synthesize": {"zskd": {"impressions": 24, "batch_size": 12}, "deepinversion": {"images": 24, "batch_size": 12}},
    })
    root = copy_project(tmp_path / "project", params)
    params["teacher"].update(write_teacher(form, root / "teachers"))
    set_params(root, params)

    run([str(BIN / "dvc"), "repro"], root)
    teacher_metadata = torch.load(root / "models/teacher.pt", weights_only=True)
    assert teacher_metadata["architecture"] == ("torch.export" if form == "torch_export" else "resnet8")
    assert InputSpec(**teacher_metadata["input"]) == SPEC
    dafl_onnx = (root / "models/student.onnx").read_bytes()

    students, transfer_sets = {dafl_onnx}, {}
    for method in ("zskd", "deepinversion", "dfad", "fast_dfkd"):
        params["synthesize"]["method"] = method
        set_params(root, params)
        output = run([str(BIN / "dvc"), "repro"], root).stdout
        assert "Running stage 'train_teacher'" not in output and "Running stage 'synthesize'" in output, method
        students.add((root / "models/student.onnx").read_bytes())
        transfer_sets[method] = load_transfer_set(root / "models/transfer_set.pt", torch.device("cpu"), SPEC)
    assert len(students) == 5
    inversions = transfer_sets["deepinversion"]
    assert isinstance(inversions, InversionTransferSet) and inversions.images.shape == (24, *SPEC.shape)
    assert isinstance(transfer_sets["dfad"], AdversarialGenerator)
    warmup = params["synthesize"]["fast_dfkd"]
    pool = transfer_sets["fast_dfkd"]  # what synthesize made: the warm-up rounds' images
    assert isinstance(pool, MetaGeneratorPool)
    assert pool.pool.shape == (warmup["warmup_rounds"] * warmup["batch_size"], *SPEC.shape)

    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["test_size"] == 18  # 20% of 90 images, stratified
    assert 0 <= metrics["student"]["onnx_accuracy"] <= 1
    metadata = {entry.key: entry.value for entry in onnx.load(str(root / "models/student.onnx")).metadata_props}
    assert InputSpec.model_validate_json(metadata["input_spec"]) == SPEC

    red = np.zeros((24, 24, 3), np.uint8)
    red[..., 0] = 220
    answer = serve_and_predict(root, png(red))
    (prediction,) = answer["predictions"]
    assert prediction["class_name"] in CLASSES and len(prediction["probabilities"]) == len(CLASSES)
