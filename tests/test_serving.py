"""The HTTP service for real: uvicorn on loopback, onnxruntime, ONNX files exported by the pipeline's code."""

import csv
import hashlib
import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import onnx
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, event, given, settings, strategies as st
from mlflow.tracking import MlflowClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import BIN, PROJECT, free_port
from dfkd.data import load_split, to_model_input
from dfkd.export import export_onnx, onnx_logits, onnx_session
from dfkd.inputs import ONNX_METADATA_KEY, InputSpec
from dfkd.zoo import ModelConfig, build_model
from serving.app import ServeSettings, create_app
from serving.model import Classifier, ModelSource, ModelSourceError
from serving.model import InputSpec as ServedInputSpec

MAX_BATCH = 4
MAX_BODY = 256 * 1024
BODY_TIMEOUT = 1.0
# MNIST's digits: 28x28 padded to LeNet-5's 32x32, one channel.
GRAYSCALE = InputSpec(channels=1, size=32, mean=(0.1307,), std=(0.3081,), class_names=tuple(map(str, range(10))), resize="pad")
# Colour images of one side only, resized to it, with statistics of their own per channel.
RGB = InputSpec(channels=3, size=16, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26),
                class_names=("airplane", "bird", "cat", "frog", "ship"), resize="bilinear")


def png_bytes(pixels: np.ndarray, **save) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) pixels as an image file, PNG unless `format` says otherwise."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1:] == (1,) else pixels).save(buffer, **({"format": "PNG"} | save))
    return buffer.getvalue()


def export_random_model(directory: Path, architecture: str, spec: InputSpec) -> Path:
    """A zoo model exported exactly as the export stage does (random weights: a fixed function is enough)."""
    torch.manual_seed(0)
    path = directory / f"{architecture}.onnx"
    model = build_model(ModelConfig(architecture=architecture), spec.channels, spec.size, spec.num_classes)
    export_onnx(model.eval(), spec, path, opset=18)
    return path


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    """LeNet-5-half on MNIST's input: one channel, 28x28 digits padded to 32x32."""
    return export_random_model(tmp_path_factory.mktemp("serving"), "lenet5_half", GRAYSCALE)


@pytest.fixture(scope="module")
def rgb_onnx_file(tmp_path_factory) -> Path:
    """ResNet-8 on 16x16 RGB images, normalised per channel, into five named classes."""
    return export_random_model(tmp_path_factory.mktemp("serving"), "resnet8", RGB)


def input_spec_of(onnx_path: Path) -> InputSpec:
    """The input spec the export stage wrote into an ONNX file."""
    return InputSpec.model_validate_json(onnx_session(onnx_path).get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])


def with_metadata(source: Path, target: Path, **properties: str) -> Path:
    """A copy of an ONNX file with its metadata replaced by `properties`."""
    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(target))
    return target


def expected_probabilities(onnx_path: Path, spec: InputSpec, images: list[np.ndarray]) -> np.ndarray:
    """onnxruntime's softmax on uint8 (S, S, C) images brought to the model's input here, apart from the
    server's code: scaled to [0, 1], normalised per channel (the last axis), made NCHW."""
    pixels = np.stack(images).astype(np.float32) / 255.0
    normalised = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    logits = onnx_logits(onnx_session(onnx_path), torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy()))
    exponentials = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def centred_on_zeros(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 (S, S, C) image padded to (size, size, C), the extra row and column, if odd, after it."""
    before = (size - image.shape[0]) // 2
    after = size - image.shape[0] - before
    return np.pad(image, ((before, after), (before, after), (0, 0)))


@contextmanager
def serving_thread(onnx_file: Path, **settings):
    """The app under uvicorn on a loopback port, in a thread of this process."""
    port = free_port()
    app = create_app(ServeSettings(model=str(onnx_file), port=port, **settings), ModelSource(onnx_file, "student", None))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        yield http
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(onnx_file):
    with serving_thread(onnx_file, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY) as http:
        yield http


@pytest.fixture(scope="module")
def rgb_client(rgb_onnx_file):
    with serving_thread(rgb_onnx_file, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY) as http:
        yield http


@pytest.fixture(scope="module")
def default_limits(onnx_file):
    """The service with its default batch and body limits, and a short body timeout."""
    with serving_thread(onnx_file, body_timeout=BODY_TIMEOUT) as http:
        yield http


@pytest.fixture(scope="module")
def rgb_default_limits(rgb_onnx_file):
    with serving_thread(rgb_onnx_file) as http:
        yield http


@contextmanager
def serving_process(args: list[str], cwd: Path, **env):
    """`python -m serving ...` as a user starts it, until it answers /ready."""
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DFKD_"))}
    environment.update({"PYTHONPATH": str(cwd), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env})
    process = subprocess.Popen(
        [sys.executable, "-m", "serving", *args, "--port", str(port)],
        cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"python -m serving exited {process.returncode}:\n{process.stdout.read()}")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "python -m serving did not become ready in 60 s"
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http
    finally:
        process.terminate()
        process.wait(timeout=30)


def predict(http: httpx.Client, images: np.ndarray) -> list[int]:
    response = http.post("/predict", json={"images": images.tolist()})
    assert response.status_code == 200, response.text
    return [prediction["class_index"] for prediction in response.json()["predictions"]]


# -- the pipeline's preprocessing and predictions ----------------------------------------------------------


@pytest.mark.parametrize("model, spec, sides", [("onnx_file", GRAYSCALE, (28, 31, 32)), ("rgb_onnx_file", RGB, (16,))])
def test_preprocessing_is_the_pipelines_to_the_bit(request, model, spec, sides):
    classifier = Classifier(ModelSource(request.getfixturevalue(model), "student", None), threads=1)
    rng = np.random.default_rng(0)
    for side in sides:
        images = rng.integers(0, 256, size=(5, side, side, spec.channels), dtype=np.uint8)
        served = classifier.preprocess([image.astype(np.float32) / 255.0 for image in images])
        assert np.array_equal(served, to_model_input(images, spec).numpy())


def test_serving_parses_the_input_spec_the_pipeline_writes():
    """serving restates dfkd.inputs.InputSpec, as it imports no pipeline code: the two must accept the same JSON."""
    def schema(model) -> dict:
        return {key: value for key, value in model.model_json_schema().items() if key != "description"}

    assert schema(ServedInputSpec) == schema(InputSpec)
    assert ServedInputSpec.model_validate_json(RGB.model_dump_json()).model_dump() == RGB.model_dump()


def test_the_server_predicts_what_the_evaluate_stage_predicted(tiny_project):
    test = load_split(tiny_project / "data/prepared/test.npz")
    with open(tiny_project / "reports/evaluate/confusion.csv") as handle:
        evaluated = [int(row["predicted"]) for row in csv.DictReader(handle)]
    with serving_process(["--model", "models/student.onnx"], tiny_project) as http:
        served = [label for start in range(0, len(test), 250) for label in predict(http, test.images[start : start + 250])]
        uploads = [("image", (f"{k}.png", png_bytes(test.images[k]), "image/png")) for k in range(8)]
        from_png = http.post("/predict", files=uploads).json()["predictions"]
        metadata = http.get("/metadata").json()
    assert served == evaluated, "every test image gets the evaluate stage's prediction"
    assert [p["class_index"] for p in from_png] == evaluated[:8]
    assert metadata["sha256"] == hashlib.sha256((tiny_project / "models/student.onnx").read_bytes()).hexdigest()
    spec = input_spec_of(tiny_project / "models/student.onnx")
    assert metadata["version"] is None and metadata["input_shape"][1:] == [spec.channels, spec.size, spec.size]


def test_a_registry_alias_serves_the_registered_version(tiny_project):
    tracking = f"sqlite:///{tiny_project / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=tracking).get_model_version_by_alias("dfkd-student", "candidate").version
    test = load_split(tiny_project / "data/prepared/test.npz")
    with serving_process(["--model", "models:/dfkd-student@candidate"], tiny_project, MLFLOW_TRACKING_URI=tracking) as http:
        metadata = http.get("/metadata").json()
        served = predict(http, test.images[:16])
    assert (metadata["name"], metadata["version"]) == ("dfkd-student", str(version))
    # The registry holds the exported file byte for byte.
    assert metadata["sha256"] == hashlib.sha256((tiny_project / "models/student.onnx").read_bytes()).hexdigest()
    with open(tiny_project / "reports/evaluate/confusion.csv") as handle:
        assert served == [int(row["predicted"]) for row in csv.DictReader(handle)][:16]


def test_mlflow_models_serve_answers_with_the_same_logits(tiny_project):
    tracking = f"sqlite:///{tiny_project / 'mlflow.db'}"
    test = load_split(tiny_project / "data/prepared/test.npz")
    model_input = to_model_input(test.images[:8], input_spec_of(tiny_project / "models/student.onnx"))
    expected = onnx_logits(onnx_session(tiny_project / "models/student.onnx"), model_input)
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DFKD_"))}
    environment.update(MLFLOW_TRACKING_URI=tracking, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/dfkd-student@candidate", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tiny_project, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "mlflow models serve did not start"
            time.sleep(0.5)
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": model_input.numpy().tolist()}, timeout=30)
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
    assert answer.status_code == 200, answer.text
    assert np.allclose(np.asarray(answer.json()["predictions"]["logits"]), expected, atol=1e-5)


def test_serving_never_imports_torch_mlflow_or_the_pipeline(onnx_file):
    """What the slim Docker image relies on: serving a file needs only requirements-serving.txt."""
    port = free_port()
    script = (
        "import sys, threading, time, json, urllib.request\n"
        "from pathlib import Path\n"
        "import uvicorn\n"
        "from serving.app import ServeSettings, create_app\n"
        "from serving.model import ModelSource\n"
        f"path = Path({str(onnx_file)!r})\n"
        f"app = create_app(ServeSettings(model=str(path), port={port}), ModelSource(path, 'student', None))\n"
        f"server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port={port}, log_level='warning'))\n"
        "threading.Thread(target=server.run, daemon=True).start()\n"
        "while not server.started: time.sleep(0.05)\n"
        "body = json.dumps({'images': [[[0] * 28] * 28]}).encode()\n"
        f"request = urllib.request.Request('http://127.0.0.1:{port}/predict', body, {{'content-type': 'application/json'}})\n"
        "assert json.load(urllib.request.urlopen(request))['predictions']\n"
        "server.should_exit = True\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "onnxruntime" in loaded and "fastapi" in loaded
    assert not loaded & {"torch", "mlflow", "onnx", "dfkd", "stages", "pipeline"}


def test_a_model_that_cannot_be_served_stops_the_start_with_its_name(tmp_path, onnx_file):
    not_onnx = tmp_path / "broken.onnx"
    not_onnx.write_bytes(b"not a model")
    no_metadata = with_metadata(onnx_file, tmp_path / "bare.onnx")
    cases = [
        (["--model", str(tmp_path / "missing.onnx")], "no such ONNX file"),
        (["--model", str(not_onnx)], "broken.onnx: not a loadable ONNX model"),
        (["--model", str(no_metadata)], "bare.onnx: the ONNX metadata lacks input_spec"),
        (["--model", "models:/dfkd-student@nowhere"], "models:/dfkd-student@nowhere: cannot be loaded"),
        (["--model", str(onnx_file), "--max-batch", "0"], "--max-batch: Input should be greater than or equal to 1"),
        (["--model", str(onnx_file), "--body-timeout", "0"], "--body-timeout: Input should be greater than 0"),
    ]
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "serving", *args], cwd=PROJECT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"},
        )
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_an_input_spec_that_is_invalid_or_not_the_models_stops_the_start(tmp_path, onnx_file):
    grayscale = GRAYSCALE.model_dump(mode="json")
    cases = [
        ("{not json", "the ONNX metadata's input_spec is invalid (Invalid JSON"),
        (json.dumps(grayscale | {"channels": 2}), "channels: Input should be 1 or 3"),
        (json.dumps(grayscale | {"mean": [0.5, 0.5, 0.5]}), "mean needs one value per channel (1)"),
        (json.dumps(grayscale | {"gamma": 2.2}), "gamma: Extra inputs are not permitted"),
        (json.dumps(grayscale | {"resize": "crop"}), "resize: Input should be 'pad' or 'bilinear'"),
        (RGB.model_copy(update={"size": 32}).model_dump_json(), "describes 3x32x32 images, the model takes ['batch', 1, 32, 32]"),
        (json.dumps(grayscale | {"class_names": ["odd", "even"]}), "names 2 classes, the model has 10 outputs"),
    ]
    for index, (spec_json, message) in enumerate(cases):
        path = with_metadata(onnx_file, tmp_path / f"spec{index}.onnx", input_spec=spec_json)
        with pytest.raises(ModelSourceError) as error:
            Classifier(ModelSource(path, "student", None), threads=1)
        assert str(error.value).startswith(f"{path}: ") and message in str(error.value), str(error.value)


def test_several_workers_share_their_metrics(onnx_file):
    with serving_process(["--model", str(onnx_file), "--workers", "2"], PROJECT) as http:
        for _ in range(6):
            assert http.post("/predict", json={"images": [[[0] * 28] * 28]}).status_code == 200
        assert http.get("/metadata").json()["onnxruntime_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
        assert metric_value(http, "dfkd_predicted_images_total") == 6


# -- the endpoints -----------------------------------------------------------------------------------------


def metric_value(http: httpx.Client, name: str, **labels) -> float:
    text = http.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def test_health_ready_metadata_and_metrics(client, onnx_file):
    assert client.get("/health").json() == {"status": "alive"}
    assert client.get("/ready").json() == {"status": "ready"}
    metadata = client.get("/metadata").json()
    assert metadata["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert {key: metadata[key] for key in GRAYSCALE.model_fields} == GRAYSCALE.model_dump(mode="json")
    assert metadata["input_shape"] == ["batch", 1, 32, 32]
    assert (metadata["max_batch"], metadata["max_body_bytes"]) == (MAX_BATCH, MAX_BODY)
    assert metadata["max_upload_pixels"] == ServeSettings.model_fields["max_upload_pixels"].default
    before = metric_value(client, "dfkd_http_requests_total", route="/predict", status="200")
    images_before = metric_value(client, "dfkd_predicted_images_total")
    assert client.post("/predict", json={"images": [[[0] * 32] * 32] * 3}).status_code == 200
    assert client.post("/predict", json={"images": []}).status_code == 422
    assert metric_value(client, "dfkd_http_requests_total", route="/predict", status="200") == before + 1
    assert metric_value(client, "dfkd_predicted_images_total") == images_before + 3
    assert metric_value(client, "dfkd_http_requests_total", route="/predict", status="422") >= 1
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_json_scales_and_png_upload_agree(client):
    digit = np.random.default_rng(1).integers(0, 256, size=(28, 28), dtype=np.uint8)
    raw = client.post("/predict", json={"images": [digit.tolist()]}).json()
    with_channel = client.post("/predict", json={"images": [digit[..., None].tolist()]}).json()
    scaled = client.post("/predict", json={"images": [(digit / 255.0).tolist()], "pixel_scale": "0-1"}).json()
    uploaded = client.post("/predict", files={"image": ("d.png", png_bytes(digit), "image/png")}).json()
    rgb = client.post("/predict", files={"image": ("d.png", png_bytes(np.stack([digit] * 3, -1)), "image/png")}).json()
    first = [answer["predictions"][0] for answer in (raw, with_channel, scaled, uploaded, rgb)]
    assert len({p["class_index"] for p in first}) == 1
    for prediction in first[1:]:
        assert np.allclose(prediction["probabilities"], first[0]["probabilities"], atol=1e-6)
    assert abs(sum(first[0]["probabilities"]) - 1) < 1e-6 and raw["model_name"] == "student"


def predictions_of(response: httpx.Response) -> tuple[np.ndarray, list[str]]:
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    return np.array([p["probabilities"] for p in predictions]), [p["class_name"] for p in predictions]


def test_grayscale_uploads_of_any_size_and_mode_are_padded_or_resized(client, onnx_file):
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, size=(20, 20), dtype=np.uint8)
    colour = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    photo = png_bytes(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8), format="JPEG", quality=90)
    uploads = [("image", ("small.png", png_bytes(small), "image/png")),
               ("image", ("colour.png", png_bytes(colour), "image/png")),
               ("image", ("photo.jpg", photo, "image/jpeg"))]
    served, names = predictions_of(client.post("/predict", files=uploads))
    expected = expected_probabilities(onnx_file, GRAYSCALE, [
        centred_on_zeros(small[..., None], 32),  # square and smaller: padded, as the pipeline pads MNIST
        centred_on_zeros(np.asarray(Image.fromarray(colour).convert("L"))[..., None], 32),
        np.asarray(Image.open(io.BytesIO(photo)).convert("L").resize((32, 32), Image.Resampling.BILINEAR))[..., None],
    ])
    assert np.allclose(served, expected, atol=1e-6)
    assert names == [GRAYSCALE.class_names[k] for k in expected.argmax(axis=1)]


def test_rgb_uploads_and_arrays_get_the_models_answer(rgb_client, rgb_onnx_file):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
    large = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    jpeg = png_bytes(rgb, format="JPEG", quality=90)
    uploads = [("image", ("rgb.png", png_bytes(rgb), "image/png")),
               ("image", ("gray.png", png_bytes(gray), "image/png")),
               ("image", ("rgb.jpg", jpeg, "image/jpeg")),
               ("image", ("large.png", png_bytes(large), "image/png"))]
    response = rgb_client.post("/predict", files=uploads)
    served, names = predictions_of(response)
    expected = expected_probabilities(rgb_onnx_file, RGB, [
        rgb,
        np.repeat(gray[..., None], 3, axis=-1),  # a grayscale upload: its value in every channel
        np.asarray(Image.open(io.BytesIO(jpeg))),  # what the JPEG decodes to
        np.asarray(Image.fromarray(large).resize((16, 16), Image.Resampling.BILINEAR)),
    ])
    assert np.allclose(served, expected, atol=1e-6)
    assert names == [RGB.class_names[k] for k in expected.argmax(axis=1)]
    from_json = rgb_client.post("/predict", json={"images": [rgb.tolist()]}).json()["predictions"]
    assert from_json == response.json()["predictions"][:1], "an (H, W, 3) array is answered as the PNG of its pixels"
    metadata = rgb_client.get("/metadata").json()
    assert {key: metadata[key] for key in RGB.model_fields} == RGB.model_dump(mode="json")
    assert metadata["input_shape"] == ["batch", 3, 16, 16]


def png_of_few_pixels(width: int, height: int) -> bytes:
    """A PNG whose header claims a size and whose data holds a hundred bytes of pixels: what a decompression
    bomb looks like before it is decoded (decoding it finds the file truncated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")


def square(side: int, value=0) -> list:
    return [[value] * side for _ in range(side)]


BAD_REQUESTS = [
    ({"content": b"{}", "headers": {"content-type": "text/plain"}}, 415, "content-type"),
    ({"content": b"{}"}, 415, "content-type"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "body"),
    ({"json": [1, 2]}, 422, "body"),
    ({"json": {}}, 422, "images"),
    ({"json": {"images": []}}, 422, "images"),
    ({"json": {"images": [square(28)] * (MAX_BATCH + 1)}}, 422, "images"),
    ({"json": {"images": [square(28)], "colour": True}}, 422, "colour"),
    ({"json": {"images": [square(33)]}}, 422, "images[0]"),
    ({"json": {"images": [square(28, [0, 0, 0])]}}, 422, "images[0]"),  # RGB pixels for a grayscale model
    ({"json": {"images": [[[0] * 28] * 27 + [[[0]] * 28]]}}, 422, "images[0]"),  # (H, W) and (H, W, 1) mixed
    ({"json": {"images": [square(28), [[0] * 28] * 27 + [[0] * 20]]}}, 422, "images[1]"),
    ({"json": {"images": [[[0] * 28] * 28, 5]}}, 422, "images[1]"),
    ({"json": {"images": [square(28, "7")]}}, 422, "images[0][0][0]"),
    ({"json": {"images": [square(28, True)]}}, 422, "images[0][0][0]"),
    ({"json": {"images": [square(28, None)]}}, 422, "images[0][0][0]"),
    ({"json": {"images": [square(28, ["7"])]}}, 422, "images[0][0][0][0]"),
    ({"content": json.dumps({"images": [square(28)]}).replace("0", "NaN", 1).encode(),
      "headers": {"content-type": "application/json"}}, 422, "images[0][0][0]"),
    ({"content": json.dumps({"images": [square(28)]}).replace("0", "1e999", 1).encode(),
      "headers": {"content-type": "application/json"}}, 422, "images[0][0][0]"),
    ({"content": json.dumps({"images": [square(28)]}).replace("0", "1" + "0" * 400, 1).encode(),
      "headers": {"content-type": "application/json"}}, 422, "images[0][0][0]"),
    ({"json": {"images": "28x28"}}, 422, "images"),
    ({"json": {"images": [[0] * 10_000]}}, 422, "body"),  # more values than MAX_BATCH images hold: refused unparsed
    ({"content": b'{"images": ' + b"[" * 1000 + b"]" * 1000 + b"}", "headers": {"content-type": "application/json"}},
     422, "body"),
    ({"json": {"images": [square(28, 256)]}}, 422, "images[0]"),
    ({"json": {"images": [square(28, -1)]}}, 422, "images[0]"),
    ({"json": {"images": [square(28, 2)], "pixel_scale": "0-1"}}, 422, "images[0]"),
    ({"json": {"images": [square(28)], "pixel_scale": "0-100"}}, 422, "pixel_scale"),
    ({"content": b"[" * (MAX_BODY + 1), "headers": {"content-type": "application/json"}}, 413, "body"),
    ({"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\n not really", "image/png")}}, 422, "image[0]"),
    ({"files": {"image": ("x.png", b"hello", "image/png")}}, 422, "image[0]"),
    ({"files": {"image": ("x.png", png_of_few_pixels(28, 28), "image/png")}}, 422, "image[0]"),
    ({"files": {"image": ("x.png", png_of_few_pixels(100_000, 100_000), "image/png")}}, 422, "image[0]"),
    ({"content": b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "headers": {"content-type": "application/json"}},
     422, "body"),
    ({"files": {"image": ("x.gif", png_bytes(np.zeros((28, 28), np.uint8), format="GIF"), "image/gif")}}, 422, "image[0]"),
    ({"files": {"image": ("x.png", png_bytes(np.zeros((28, 28), np.uint16)), "image/png")}}, 422, "image[0]"),
    ({"files": {"picture": ("x.png", png_bytes(np.zeros((28, 28), np.uint8)), "image/png")}}, 422, "picture"),
    ({"files": {"image": (None, "not a file")}}, 422, "image[0]"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422, "image"),
]


RGB_BAD_REQUESTS = [
    ({"json": {"images": [square(16)]}}, 422, "images[0]"),  # (H, W): no channels
    ({"json": {"images": [square(16, [0])]}}, 422, "images[0]"),
    ({"json": {"images": [square(16, [0, 0, 0, 0])]}}, 422, "images[0]"),
    ({"json": {"images": [square(15, [0, 0, 0])]}}, 422, "images[0]"),  # arrays are never resized
    ({"json": {"images": [square(32, [0, 0, 0])]}}, 422, "images[0]"),
    ({"json": {"images": [square(16, [0, "7", 0])]}}, 422, "images[0][0][0][1]"),
    ({"json": {"images": [square(16, [0, 0, 256])]}}, 422, "images[0]"),
    ({"json": {"images": [square(16, [0, 0, 1.5])], "pixel_scale": "0-1"}}, 422, "images[0]"),
]


def assert_refused(http: httpx.Client, request_kwargs: dict, status: int, field: str) -> None:
    response = http.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    errors = response.json()["errors"]
    assert errors and errors[0]["field"] == field and errors[0]["problem"], errors
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("request_kwargs, status, field", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_naming_the_field(client, request_kwargs, status, field):
    assert_refused(client, request_kwargs, status, field)


@pytest.mark.parametrize("request_kwargs, status, field", RGB_BAD_REQUESTS)
def test_bad_input_for_an_rgb_model_gets_a_4xx_naming_the_field(rgb_client, request_kwargs, status, field):
    assert_refused(rgb_client, request_kwargs, status, field)


def test_uploads_over_the_pixel_limit_are_refused_from_their_headers(client):
    """Uploads of any size are taken, so what decoding them costs is bounded by --max-upload-pixels, summed over
    a request and checked against their headers before any is decoded: decoding the first would find it truncated."""
    limit = ServeSettings.model_fields["max_upload_pixels"].default
    side = int((limit * 0.6) ** 0.5)  # one is within the limit, two are not
    uploads = [("image", (f"{k}.png", png_of_few_pixels(side, side), "image/png")) for k in range(2)]
    response = client.post("/predict", files=uploads)
    assert response.status_code == 422 and response.json()["errors"] == [{
        "field": "image[1]",
        "problem": f"{side}x{side}: the uploads hold {2 * side * side} pixels up to this one, over the limit of {limit} per request",
    }]


def test_a_body_streamed_past_the_limit_is_cut_off(client):
    def chunks():
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["errors"][0]["field"] == "body"


# -- abusive clients: what a request costs and how long it may hold a connection are bounded --------------

MILLIONS_OF_VALUES = {  # prefix, item, how many, suffix: bodies just under the default 8 MiB limit
    "2 million strings": (b'{"images": [[[', b'"a"', 2_000_000, b"]]]}"),
    "1.39 million 1x1 images": (b'{"images": [', b"[[0]]", 1_390_000, b"]}"),
}


def peak_memory_mib() -> float:
    """This process's peak resident memory since it started or since `reset_peak_memory` (Linux's VmHWM):
    the server's too, as it runs in a thread of this process."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024


def reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")


@pytest.mark.parametrize("kind", MILLIONS_OF_VALUES)
def test_a_body_of_millions_of_values_is_refused_fast_and_health_keeps_answering(default_limits, kind):
    prefix, item, count, suffix = MILLIONS_OF_VALUES[kind]
    body = prefix + b",".join([item] * count) + suffix
    assert len(body) <= ServeSettings.model_fields["max_body_bytes"].default
    health: list[tuple[int, float]] = []  # (status, seconds) of each /health asked meanwhile
    polling, done = threading.Event(), threading.Event()

    def ask_health():
        with httpx.Client(base_url=default_limits.base_url, timeout=30) as http:
            while not done.is_set():
                start = time.perf_counter()
                health.append((http.get("/health").status_code, time.perf_counter() - start))
                polling.set()
                time.sleep(0.005)

    poller = threading.Thread(target=ask_health)
    poller.start()
    polling.wait(timeout=10)
    reset_peak_memory()
    memory_before = peak_memory_mib()
    start = time.perf_counter()
    response = default_limits.post("/predict", content=body, headers={"content-type": "application/json"})
    seconds = time.perf_counter() - start
    done.set()
    poller.join()
    # Before the value bound: 17 s and 2.7 GiB for the strings, 2.3 s and 580 MiB for the images.
    assert response.status_code == 422 and seconds < 2, f"{response.status_code} in {seconds:.1f} s"
    assert peak_memory_mib() - memory_before < 100, "the server's memory grew by 100 MiB or more"
    assert health and all(status == 200 and latency < 1 for status, latency in health), health
    assert response.json()["errors"][0]["field"] == "body", "refused before it is parsed"


@pytest.mark.parametrize("service", ["default_limits", "rgb_default_limits"])
def test_the_largest_valid_batch_is_within_the_value_bound(request, service):
    """The largest batch in the form with the most values: every image (S, S, C)."""
    http = request.getfixturevalue(service)
    metadata = http.get("/metadata").json()
    shape = (metadata["max_batch"], metadata["size"], metadata["size"], metadata["channels"])
    images = np.random.default_rng(0).integers(0, 256, size=shape)
    response = http.post("/predict", json={"images": images.tolist()})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == metadata["max_batch"]


def send_part_of_a_body(http: httpx.Client) -> socket.socket:
    """A connection carrying the headers of a /predict request and 20 of its 1,000 body bytes."""
    connection = socket.create_connection((http.base_url.host, http.base_url.port))
    connection.sendall(
        b"POST /predict HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
        b'{"images": [[[0, 0, '
    )
    return connection


def read_until_closed(connection: socket.socket, within: float) -> bytes:
    """All the server sends until it closes the connection; fails if it is still open after `within` seconds."""
    connection.settimeout(within)
    chunks = []
    try:
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        pytest.fail(f"the connection was still open after {within} s")
    return b"".join(chunks)


def test_a_stalled_body_is_answered_408_and_its_connection_closed(default_limits):
    start = time.monotonic()
    stalled = [send_part_of_a_body(default_limits) for _ in range(20)]
    answers = [read_until_closed(connection, within=BODY_TIMEOUT + 5) for connection in stalled]
    seconds = time.monotonic() - start
    for connection in stalled:
        connection.close()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), answer
        assert json.loads(body)["errors"][0]["field"] == "body"
    assert BODY_TIMEOUT <= seconds < BODY_TIMEOUT + 3, f"closed after {seconds:.1f} s"
    assert default_limits.get("/health").status_code == 200


def test_a_client_that_leaves_mid_body_is_counted_apart_and_logs_no_traceback(client, caplog):
    def count(status: str) -> float:
        return metric_value(client, "dfkd_http_requests_total", route="/predict", status=status)

    disconnected, failed = count("client_disconnected"), count("500")
    uvicorn_log = logging.getLogger("uvicorn.error")  # where uvicorn logs an application's exception
    uvicorn_log.addHandler(caplog.handler)
    try:
        for _ in range(3):
            send_part_of_a_body(client).close()
        deadline = time.monotonic() + 5
        while count("client_disconnected") + count("500") < disconnected + failed + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert (count("client_disconnected"), count("500")) == (disconnected + 3, failed)
    assert not caplog.records, [record.getMessage() for record in caplog.records]


def test_unknown_paths_and_methods_answer_in_the_same_format(client):
    assert client.get("/nowhere").json()["errors"][0] == {"field": "path", "problem": "Not Found: GET /nowhere"}
    assert client.get("/predict").status_code == 405 and client.get("/predict").json()["errors"][0]["field"] == "method"


# -- the OpenAPI description matches what the service accepts: fuzzed ---------------------------------------

PIXELS = st.one_of(
    st.integers(0, 255), st.floats(0, 1), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=2),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def images(draw, size: int) -> list:
    """Mostly well-formed images of a model of side `size`, (S, S) or (S, S, 1 or 3), some with an odd value,
    a wrong side, a ragged row or a pixel of another length."""
    side = draw(st.sampled_from([size] * 4 + [size - 4, size - 1, size + 1]))
    depth = draw(st.sampled_from([None, 1, 3]))  # None: one number per pixel
    value = draw(st.one_of(st.integers(0, 1), st.floats(0, 1), st.integers(0, 255)))
    image = [[value if depth is None else [value] * depth for _ in range(side)] for _ in range(side)]
    flaw = draw(st.sampled_from(["none"] * 6 + ["value", "value", "ragged", "pixel length"]))
    y, x = draw(st.integers(0, side - 1)), draw(st.integers(0, side - 1))
    if flaw == "value" and depth is None:
        image[y][x] = draw(PIXELS)
    elif flaw == "value":
        image[y][x][draw(st.integers(0, depth - 1))] = draw(PIXELS)
    elif flaw == "ragged":
        image[y].pop()
    elif flaw == "pixel length":
        image[y][x] = image[y][x][1:] if depth else [value]
    return image


def bodies(size: int):
    requests = st.fixed_dictionaries(
        {"images": st.lists(images(size), min_size=1, max_size=2)},
        optional={"pixel_scale": st.sampled_from(["0-255", "0-1", "0-255", "0-1", "1", 1])},
    )
    odd_requests = st.fixed_dictionaries(
        {"images": st.lists(images(size), max_size=MAX_BATCH + 1)},
        optional={"pixel_scale": st.sampled_from(["0-255", "0-1", "1", 1]), "extra": JSON_VALUES},
    )
    return st.one_of(requests, odd_requests, JSON_VALUES)


def finite(value) -> bool:
    if isinstance(value, float):
        return np.isfinite(value)
    if isinstance(value, list):
        return all(finite(item) for item in value)
    if isinstance(value, dict):
        return all(finite(item) for item in value.values())
    return True


@pytest.fixture(scope="module", params=["client", "rgb_client"])
def described_service(request) -> tuple[httpx.Client, dict, int]:
    """A service, its OpenAPI description and its model's side."""
    http = request.getfixturevalue(request.param)
    return http, http.get("/openapi.json").json(), http.get("/metadata").json()["size"]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_the_service_accepts_exactly_what_its_openapi_describes(described_service, data):
    http, openapi, size = described_service
    body = data.draw(bodies(size), label="body")
    operation = openapi["paths"]["/predict"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    components = {"components": openapi["components"]}
    response = http.post("/predict", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert str(response.status_code) in operation["responses"], response.text
    documented = operation["responses"][str(response.status_code)]["content"]["application/json"]["schema"]
    jsonschema.validate(response.json(), {**documented, **components})
    expected_ok = finite(body) and jsonschema.Draft202012Validator(schema).is_valid(body)
    event(f"status {response.status_code}")
    assert (response.status_code == 200) == expected_ok, (response.status_code, response.text[:300])
    if response.status_code == 200:
        assert len(response.json()["predictions"]) == len(body["images"])
