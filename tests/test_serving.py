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

from conftest import BIN, PROJECT
from dfkd.data import load_split, to_model_input
from dfkd.export import export_onnx, onnx_logits, onnx_session
from dfkd.models import ArchitectureConfig, LeNet5
from serving.app import ServeSettings, create_app
from serving.model import Classifier, ModelSource

MAX_BATCH = 4
MAX_BODY = 256 * 1024
BODY_TIMEOUT = 1.0


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
def default_limits(onnx_file):
    """The service with its default batch and body limits, and a short body timeout."""
    with serving_thread(onnx_file, body_timeout=BODY_TIMEOUT) as http:
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
        (["--model", str(onnx_file), "--body-timeout", "0"], "--body-timeout: Input should be greater than 0"),
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
    ({"content": json.dumps({"images": [square(28)]}).replace("0", "1" + "0" * 400, 1).encode(),
      "headers": {"content-type": "application/json"}}, 422, "images[0][0][0]"),
    ({"json": {"images": "28x28"}}, 422, "images"),
    ({"json": {"images": [[0] * 5000]}}, 422, "body"),  # more values than MAX_BATCH images hold: refused unparsed
    ({"content": b'{"images": ' + b"[" * 1000 + b"]" * 1000 + b"}", "headers": {"content-type": "application/json"}},
     422, "body"),
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


def test_the_largest_valid_batch_is_within_the_value_bound(default_limits):
    metadata = default_limits.get("/metadata").json()
    side = max(metadata["image_sizes"])
    images = np.random.default_rng(0).random((metadata["max_batch"], side, side))
    response = default_limits.post("/predict", json={"images": images.tolist(), "pixel_scale": "0-1"})
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
