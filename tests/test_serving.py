"""The HTTP service for real: uvicorn on loopback, onnxruntime, ONNX files exported by the pipeline's code."""

import csv
import hashlib
import io
import json
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

from conftest import BIN, PROJECT
from dfkd.data import load_split, to_model_input
from dfkd.export import export_onnx, onnx_logits, onnx_session
from dfkd.models import ArchitectureConfig, LeNet5
from serving.app import ServeSettings, create_app
from serving.model import Classifier, ModelSource

MAX_BATCH = 4
MAX_BODY = 256 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_bytes(pixels: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, **({"format": "PNG"} | save))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    """A LeNet-5-half exported exactly as the export stage does (random weights: a fixed function is enough)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serving") / "student.onnx"
    classes = json.dumps([str(k) for k in range(10)])
    export_onnx(LeNet5(ArchitectureConfig(width=0.5)).eval(), path, opset=18, metadata={"class_names": classes})
    return path


@pytest.fixture(scope="module")
def client(onnx_file):
    """The app under uvicorn on a loopback port, in a thread of this process."""
    port = free_port()
    app = create_app(
        ServeSettings(model=str(onnx_file), port=port, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY),
        ModelSource(onnx_file, "student", None),
    )
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


def test_preprocessing_is_the_pipelines_to_the_bit(onnx_file):
    classifier = Classifier(ModelSource(onnx_file, "student", None), threads=1)
    rng = np.random.default_rng(0)
    for side in (28, 32):
        images = rng.integers(0, 256, size=(5, side, side), dtype=np.uint8)
        served = classifier.preprocess([image.astype(np.float32) / 255.0 for image in images])
        assert np.array_equal(served, to_model_input(images).numpy())


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
    assert metadata["version"] is None and metadata["input_shape"][1:] == [1, 32, 32]


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
    model_input = to_model_input(test.images[:8])
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
    no_metadata = tmp_path / "bare.onnx"
    proto = onnx.load(str(onnx_file))
    del proto.metadata_props[:]
    onnx.save_model(proto, str(no_metadata))
    cases = [
        (["--model", str(tmp_path / "missing.onnx")], "no such ONNX file"),
        (["--model", str(not_onnx)], "broken.onnx: not a loadable ONNX model"),
        (["--model", str(no_metadata)], "bare.onnx: the ONNX metadata lacks pixel_mean"),
        (["--model", "models:/dfkd-student@nowhere"], "models:/dfkd-student@nowhere: cannot be loaded"),
        (["--model", str(onnx_file), "--max-batch", "0"], "--max-batch: Input should be greater than or equal to 1"),
    ]
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "serving", *args], cwd=PROJECT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"},
        )
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


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
    assert metadata["class_names"] == [str(k) for k in range(10)] and metadata["image_sizes"] == [28, 32]
    assert (metadata["max_batch"], metadata["max_body_bytes"]) == (MAX_BATCH, MAX_BODY)
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
    scaled = client.post("/predict", json={"images": [(digit / 255.0).tolist()], "pixel_scale": "0-1"}).json()
    uploaded = client.post("/predict", files={"image": ("d.png", png_bytes(digit), "image/png")}).json()
    rgb = client.post("/predict", files={"image": ("d.png", png_bytes(np.stack([digit] * 3, -1)), "image/png")}).json()
    first = [answer["predictions"][0] for answer in (raw, scaled, uploaded, rgb)]
    assert len({p["class_index"] for p in first}) == 1
    for prediction in first[1:]:
        assert np.allclose(prediction["probabilities"], first[0]["probabilities"], atol=1e-6)
    assert abs(sum(first[0]["probabilities"]) - 1) < 1e-6 and raw["model_name"] == "student"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and header chunk claiming a size, and no pixels: what a decompression bomb starts with."""
    header = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header))


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
    ({"json": {"images": [square(30)]}}, 422, "images[0]"),
    ({"json": {"images": [square(28), [[0] * 28] * 27 + [[0] * 20]]}}, 422, "images[1]"),
    ({"json": {"images": [[[0] * 28] * 28, 5]}}, 422, "images[1]"),
    ({"json": {"images": [square(28, "7")]}}, 422, "images[0][0][0]"),
    ({"json": {"images": [square(28, True)]}}, 422, "images[0][0][0]"),
    ({"json": {"images": [square(28, None)]}}, 422, "images[0][0][0]"),
    ({"content": json.dumps({"images": [square(28)]}).replace("0", "NaN", 1).encode(),
      "headers": {"content-type": "application/json"}}, 422, "images[0][0][0]"),
    ({"content": json.dumps({"images": [square(28)]}).replace("0", "1e999", 1).encode(),
      "headers": {"content-type": "application/json"}}, 422, "images[0][0][0]"),
    ({"json": {"images": [square(28, 256)]}}, 422, "images[0]"),
    ({"json": {"images": [square(28, -1)]}}, 422, "images[0]"),
    ({"json": {"images": [square(28, 2)], "pixel_scale": "0-1"}}, 422, "images[0]"),
    ({"json": {"images": [square(28)], "pixel_scale": "0-100"}}, 422, "pixel_scale"),
    ({"content": b"[" * (MAX_BODY + 1), "headers": {"content-type": "application/json"}}, 413, "body"),
    ({"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\n not really", "image/png")}}, 422, "image[0]"),
    ({"files": {"image": ("x.png", b"hello", "image/png")}}, 422, "image[0]"),
    ({"files": {"image": ("x.png", png_bytes(np.zeros((30, 30), np.uint8)), "image/png")}}, 422, "image[0]"),
    ({"files": {"image": ("x.png", png_header_only(28, 28), "image/png")}}, 422, "image[0]"),
    ({"files": {"image": ("x.png", png_header_only(100_000, 100_000), "image/png")}}, 422, "image[0]"),
    ({"content": b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "headers": {"content-type": "application/json"}},
     422, "body"),
    ({"files": {"image": ("x.jpg", png_bytes(np.zeros((28, 28), np.uint8), format="JPEG"), "image/jpeg")}}, 422, "image[0]"),
    ({"files": {"image": ("x.png", png_bytes(np.zeros((28, 28), np.uint16)), "image/png")}}, 422, "image[0]"),
    ({"files": {"picture": ("x.png", png_bytes(np.zeros((28, 28), np.uint8)), "image/png")}}, 422, "picture"),
    ({"files": {"image": (None, "not a file")}}, 422, "image[0]"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422, "image"),
]


@pytest.mark.parametrize("request_kwargs, status, field", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_naming_the_field(client, request_kwargs, status, field):
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    errors = response.json()["errors"]
    assert errors and errors[0]["field"] == field and errors[0]["problem"], errors
    assert client.get("/health").status_code == 200


def test_a_body_streamed_past_the_limit_is_cut_off(client):
    def chunks():
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["errors"][0]["field"] == "body"


def test_unknown_paths_and_methods_answer_in_the_same_format(client):
    assert client.get("/nowhere").json()["errors"][0] == {"field": "path", "problem": "Not Found: GET /nowhere"}
    assert client.get("/predict").status_code == 405 and client.get("/predict").json()["errors"][0]["field"] == "method"


# -- the OpenAPI description matches what the service accepts: fuzzed ---------------------------------------

SIDES = st.sampled_from([28, 32] * 4 + [27, 31, 33])
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
def images(draw) -> list:
    """Mostly well-formed images, some with an odd pixel, a wrong size or a ragged row."""
    side = draw(SIDES)
    image = square(side, draw(st.one_of(st.integers(0, 1), st.floats(0, 1), st.integers(0, 255))))
    flaw = draw(st.sampled_from(["none"] * 6 + ["pixel", "pixel", "ragged"]))
    if flaw == "pixel":
        image[draw(st.integers(0, side - 1))][draw(st.integers(0, side - 1))] = draw(PIXELS)
    elif flaw == "ragged":
        image[draw(st.integers(0, side - 1))].pop()
    return image


REQUESTS = st.fixed_dictionaries(
    {"images": st.lists(images(), min_size=1, max_size=2)},
    optional={"pixel_scale": st.sampled_from(["0-255", "0-1", "0-255", "0-1", "1", 1])},
)
ODD_REQUESTS = st.fixed_dictionaries(
    {"images": st.lists(images(), max_size=MAX_BATCH + 1)},
    optional={"pixel_scale": st.sampled_from(["0-255", "0-1", "1", 1]), "extra": JSON_VALUES},
)
BODIES = st.one_of(REQUESTS, ODD_REQUESTS, JSON_VALUES)


def finite(value) -> bool:
    if isinstance(value, float):
        return np.isfinite(value)
    if isinstance(value, list):
        return all(finite(item) for item in value)
    if isinstance(value, dict):
        return all(finite(item) for item in value.values())
    return True


@pytest.fixture(scope="module")
def openapi(client) -> dict:
    return client.get("/openapi.json").json()


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=BODIES)
def test_fuzz_the_service_accepts_exactly_what_its_openapi_describes(client, openapi, body):
    operation = openapi["paths"]["/predict"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    components = {"components": openapi["components"]}
    response = client.post("/predict", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert str(response.status_code) in operation["responses"], response.text
    documented = operation["responses"][str(response.status_code)]["content"]["application/json"]["schema"]
    jsonschema.validate(response.json(), {**documented, **components})
    expected_ok = finite(body) and jsonschema.Draft202012Validator(schema).is_valid(body)
    event(f"status {response.status_code}")
    assert (response.status_code == 200) == expected_ok, (response.status_code, response.text[:300])
    if response.status_code == 200:
        assert len(response.json()["predictions"]) == len(body["images"])
