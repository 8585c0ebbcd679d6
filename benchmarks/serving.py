"""Benchmark of the HTTP service against `mlflow models serve`, on the same ONNX file, on loopback.

Both servers run as they are documented (one worker each, default settings; access logs off for
both). The load generator is wrk (C, epoll; `apt-get install wrk`) on one thread: `concurrency`
keep-alive connections, each sending its next request as soon as the previous answer arrived, for a
fixed time after a warm-up. On a 2-core machine it still takes some CPU from the server under test;
both servers pay the same.

Requests: ours gets raw 28x28 pixel arrays (0-255 integers) and does the preprocessing itself;
MLflow's scoring server gets the model's normalised (N, 1, 32, 32) float tensor as {"inputs": ...}
(it has no preprocessing), rounded to 4 decimals. Answers must be 200 with one prediction per image.

    python benchmarks/serving.py                         # models/student.onnx, writes BENCHMARKS.md
    python benchmarks/serving.py --model other.onnx --seconds 10 --soak-seconds 60
"""

import argparse
import concurrent.futures
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np
import psutil

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.report import machine, write_section  # noqa: E402
from serving.model import Classifier, ModelSource  # noqa: E402

BIN = Path(sys.executable).parent
WARM_UP_SECONDS = 2.0
WRK = shutil.which("wrk")  # the load generator: wrk (C, epoll), `apt-get install wrk` on Debian
WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree(root: psutil.Process) -> tuple[int, float]:
    """Resident memory (bytes) and CPU time used so far (seconds) of a process and its children."""
    rss, cpu = 0, 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            rss += process.memory_info().rss
            times = process.cpu_times()
            cpu += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return rss, cpu


class Server:
    """A server process on loopback, started and waited for until `ready_path` answers 200."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, predict_path: str, env: dict):
        self.name, self.port, self.predict_path = name, port, predict_path
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.psutil = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{name} exited at start:\n{self.log.read().decode()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise SystemExit(f"{name} did not become ready in 120 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.predict_path}"

    def stop(self) -> None:
        os.killpg(self.process.pid, 15)
        self.process.wait(timeout=30)


def wrk_version() -> str:
    return subprocess.run([WRK, "--version"], capture_output=True, text=True).stdout.split()[1]


def check_answer(server: Server, body: bytes, batch: int) -> None:
    """One request before the load: a 200 with one prediction per image (wrk counts only statuses)."""
    request = urllib.request.Request(server.url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        predictions = predictions_of(response.read())
    if len(predictions) != batch:
        raise SystemExit(f"{server.name} answered {len(predictions)} predictions for {batch} images")


def wrk(server: Server, body_file: Path, concurrency: int, seconds: float) -> dict:
    """wrk on one thread, `concurrency` keep-alive connections, for `seconds`; its figures as a dict."""
    done = subprocess.run(
        [WRK, "--threads", "1", "--connections", str(concurrency), "--duration", f"{seconds:g}s",
         "--timeout", "10s", "--script", str(WRK_SCRIPT), server.url],
        env={**os.environ, "WRK_BODY": str(body_file)}, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def load(server: Server, body_file: Path, batch: int, concurrency: int, seconds: float) -> dict:
    """A warm-up, then the measured wrk run, sampling the server's memory every second meanwhile."""
    wrk(server, body_file, concurrency, WARM_UP_SECONDS)
    rss: list[tuple[float, tuple[int, float]]] = []
    start = time.perf_counter()
    rss.append((0.0, process_tree(server.psutil)))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        measured = pool.submit(wrk, server, body_file, concurrency, seconds)
        while not measured.done():
            time.sleep(1.0)
            rss.append((time.perf_counter() - start, process_tree(server.psutil)))
        figures = measured.result()
    server_cpu = process_tree(server.psutil)[1] - rss[0][1][1]
    elapsed = figures["duration_us"] / 1e6
    requests = figures["requests"]
    return {
        "server": server.name,
        "batch": batch,
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests": requests,
        "requests_per_s": requests / elapsed,
        "images_per_s": requests * batch / elapsed,
        "p50_ms": figures["p50_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "errors": figures["socket_errors"] + figures["non_2xx"],
        "server_cpu_ms_per_request": server_cpu * 1000 / max(1, requests),
        "rss_mib": [(round(t, 1), round(value / 2**20, 1)) for t, (value, _) in rss],
    }


def predictions_of(answer: bytes) -> list:
    """Ours answers {"predictions": [...]}, MLflow's scoring server {"predictions": {"logits": [...]}}."""
    predictions = json.loads(answer)["predictions"]
    return predictions["logits"] if isinstance(predictions, dict) else predictions


def bodies(classifier: Classifier, batch: int) -> tuple[bytes, bytes]:
    """The same `batch` images for both servers: raw pixels for ours, the model's input for MLflow."""
    rng = np.random.default_rng(batch)
    pixels = rng.integers(0, 256, size=(batch, 28, 28), dtype=np.uint8)
    ours = json.dumps({"images": pixels.tolist()}).encode()
    model_input = classifier.preprocess([image.astype(np.float32) / 255.0 for image in pixels])
    theirs = json.dumps({"inputs": np.round(model_input.astype(np.float64), 4).tolist()}).encode()
    return ours, theirs


def save_mlflow_model(onnx_path: Path, destination: Path) -> None:
    """The same ONNX file in MLflow's ONNX flavour, as the export stage logs it."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    example = np.zeros((1, 1, 32, 32), np.float32)
    signature = infer_signature(example, np.zeros((1, 10), np.float32))
    mlflow.onnx.save_model(onnx.load(str(onnx_path)), str(destination), signature=signature, save_as_external_data=False)


def scenario_table(results: list[dict]) -> str:
    lines = [
        "| server | batch | concurrency | seconds | requests | req/s | images/s | p50 ms | p99 ms | errors "
        "| server CPU ms/request | RSS MiB (first -> last sample) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        memory = f"{r['rss_mib'][0][1]:.0f} -> {r['rss_mib'][-1][1]:.0f}" if r["rss_mib"] else ""
        lines.append(
            f"| {r['server']} | {r['batch']} | {r['concurrency']} | {r['seconds']:.0f} | {r['requests']:,} "
            f"| {r['requests_per_s']:,.0f} | {r['images_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['errors']} | {r['server_cpu_ms_per_request']:.3f} | {memory} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=PROJECT / "models" / "student.onnx")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time of each scenario")
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="measured time of batch 1, concurrency 16")
    parser.add_argument("--serving-args", default="", help="extra options for python -m serving, e.g. '--workers 2'")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if WRK is None:
        raise SystemExit("wrk, the load generator, is not on PATH (Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk)")
    load_at_start = os.getloadavg()[0]
    classifier = Classifier(ModelSource(args.model, args.model.stem, None), threads=1)
    scenarios = [(1, 1, args.seconds), (1, 16, args.soak_seconds), (64, 1, args.seconds), (64, 16, args.seconds)]
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "UVICORN_ACCESS_LOG": "false"}
    results = []
    with tempfile.TemporaryDirectory(prefix="dfkd-serving-bench-") as scratch:
        save_mlflow_model(args.model, Path(scratch) / "mlflow-model")
        servers = [
            ("ours", [sys.executable, "-m", "serving", "--model", str(args.model), *shlex.split(args.serving_args)],
             "/ready", "/predict"),
            ("mlflow models serve", [str(BIN / "mlflow"), "models", "serve", "-m", str(Path(scratch) / "mlflow-model"),
                                     "--env-manager", "local", "--host", "127.0.0.1"], "/ping", "/invocations"),
        ]
        for name, command, ready_path, predict_path in servers:
            port = free_port()
            command = command + ["--port", str(port)]
            server = Server(name, command, port, ready_path, predict_path, {**environment, "PYTHONPATH": str(PROJECT)})
            try:
                for batch, concurrency, seconds in scenarios:
                    ours, theirs = bodies(classifier, batch)
                    body_file = Path(scratch) / f"{name.split()[0]}-batch{batch}.json"
                    body = ours if name == "ours" else theirs
                    body_file.write_bytes(body)
                    check_answer(server, body, batch)
                    result = load(server, body_file, batch, concurrency, seconds)
                    results.append(result)
                    print(
                        f"{name:20s} batch {batch:3d} c{concurrency:<3d} {result['requests_per_s']:8.0f} req/s "
                        f"p50 {result['p50_ms']:7.2f} ms p99 {result['p99_ms']:7.2f} ms errors {result['errors']}",
                        flush=True,
                    )
            finally:
                server.stop()

    def find(server: str, batch: int, concurrency: int) -> dict:
        return next(r for r in results if (r["server"], r["batch"], r["concurrency"]) == (server, batch, concurrency))

    ours, theirs = find("ours", 1, 16), find("mlflow models serve", 1, 16)
    speedup = ours["requests_per_s"] / theirs["requests_per_s"]
    memory = [value for _, value in ours["rss_mib"]]
    growth = statistics.median(memory[-5:]) - statistics.median(memory[:5])
    errors = sum(r["errors"] for r in results)
    checks = [
        (f"throughput at batch 1, concurrency 16: {speedup:.1f}x mlflow models serve", speedup >= 3),
        (f"p99 at batch 1, concurrency 16: {ours['p99_ms']:.2f} ms", ours["p99_ms"] < 20),
        (f"errors over every scenario and both servers: {errors}", errors == 0),
        (f"RSS over the {ours['seconds']:.0f} s run: {min(memory):.0f} to {max(memory):.0f} MiB, median of the last "
         f"5 samples {growth:+.1f} MiB from the first 5", abs(growth) < 5),
    ]
    body = "\n".join([
        "## HTTP serving (`benchmarks/serving.py`)",
        "",
        f"{date.today().isoformat()} on {machine()}. Both servers on loopback, one worker each, access logs off,",
        f"on the same ONNX student (`{args.model.name}`, sha256 {classifier.sha256[:12]}...): `python -m serving` with its",
        "defaults (1 worker, onnxruntime threads = cores // workers), `mlflow models serve --env-manager local`",
        "(its uvicorn app, one worker).",
        f"Load: wrk {wrk_version()} on one thread, `concurrency` keep-alive connections (closed loop), {WARM_UP_SECONDS:.0f} s",
        "warm-up then the measured window; it shares the 2 cores with the server under test. Each scenario's",
        "answer is checked once before the load (200, one prediction per image); errors are wrk's socket",
        "errors and non-2xx answers.",
        "Ours receives raw 28x28 pixels (0-255) and preprocesses them; MLflow receives the normalised",
        "(N, 1, 32, 32) tensor. Batch 1 at concurrency 16 runs for the memory soak. Server CPU per request (user +",
        "system time of the server's processes over the window) does not depend on what else the machine runs.",
        f"Load average when the run started: {load_at_start:.2f}.",
        "",
        scenario_table(results),
        "",
        "Bar (issue 5):",
        *[f"- {'met' if passed else 'NOT MET'}: {text}" for text, passed in checks],
    ])
    print("\n" + body)
    if not args.no_write:
        write_section("serving", body)


if __name__ == "__main__":
    main()
