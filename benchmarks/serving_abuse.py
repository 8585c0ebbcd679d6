"""What abusive clients cost the HTTP service, against what a valid maximum batch costs (issue 20).

Bodies: each kind goes to a fresh `python -m serving` on loopback (default limits: --max-batch 256,
--max-body-bytes 8 MiB), `--repeats` times one after another, while another connection asks /health
every 5 ms. Per kind: the answers, the slowest one, the worst /health latency meanwhile, and the
server's resident memory at rest and at its peak (VmHWM, reset after start-up and a warm-up request).

Connections: `--connections` clients that send their headers and part of a body, then stall (the
server started with `--body-timeout`), and as many that close their connection mid-body; what the
server answered, when it closed them, what /metrics counted and whether its log holds a traceback.

    python benchmarks/serving_abuse.py                   # models/student.onnx, writes BENCHMARKS.md
    python benchmarks/serving_abuse.py --model other.onnx --repeats 5 --no-write
"""

import argparse
import http.client
import json
import os
import selectors
import socket
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.report import machine, write_section  # noqa: E402
from benchmarks.serving import BIN, Server, free_port  # noqa: E402

HEALTH_INTERVAL_S = 0.005
PARTIAL_BODY = b'{"images": [[[0, 0, 0'  # what a stalling or vanishing client sends of its 1,000-byte body


class HealthPoller:
    """Asks /health every 5 ms on one keep-alive connection while in its `with` block; keeps the worst latency."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.worst_s = 0.0
        self.failures = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                self.connection.request("GET", "/health")
                response = self.connection.getresponse()
                response.read()
                self.failures += response.status != 200
            except OSError:
                self.failures += 1
                self.connection.close()
            self.worst_s = max(self.worst_s, time.perf_counter() - start)
            self.stop.wait(HEALTH_INTERVAL_S)

    def __enter__(self) -> "HealthPoller":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.connection.close()


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak since start or since `reset_peak_memory`) of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak_memory(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def post(port: int, path: str, body: bytes) -> tuple[int, float, bytes]:
    """One POST on a new connection: status, seconds from sending to the full answer, answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    try:
        connection.request("POST", path, body, {"content-type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        return response.status, time.perf_counter() - start, answer
    finally:
        connection.close()


def request_bodies(max_batch: int, sizes: list[int], max_body: int) -> dict[str, bytes]:
    """Two valid maximum batches and the abusive bodies of issue 20, each within `max_body` bytes."""

    def filled(prefix: bytes, item: bytes, suffix: bytes) -> bytes:
        """`prefix`, then as many comma-separated `item`s as fit in `max_body` bytes, then `suffix`."""
        count = (max_body - len(prefix) - len(suffix) + 1) // (len(item) + 1)
        return prefix + b",".join([item] * count) + suffix

    small, large = min(sizes), max(sizes)
    rng = np.random.default_rng(0)
    strings = filled(b'{"images": [[[', b'"a"', b"]]]}")
    tiny_images = filled(b'{"images": [', b"[[0]]", b"]}")
    return {
        f"valid: {max_batch} {small}x{small} images, 0-255 integers":
            json.dumps({"images": rng.integers(0, 256, (max_batch, small, small)).tolist()}).encode(),
        f"valid: {max_batch} {large}x{large} images, 0-1 floats (17 digits)":
            json.dumps({"images": rng.random((max_batch, large, large)).tolist(), "pixel_scale": "0-1"}).encode(),
        f"{strings.count(b',') + 1:,} strings": strings,
        f"{tiny_images.count(b',') + 1:,} 1x1 images": tiny_images,
        f"{max_batch} {large}x{large} images of strings":
            json.dumps({"images": [[["a"] * large] * large] * max_batch}).encode(),
    }


def start_server(args: argparse.Namespace, *options: str) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "serving", "--model", str(args.model), "--port", str(port), *options]
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return Server("ours", command, port, "/ready", "/predict", environment)


def measure_body(args: argparse.Namespace, name: str, body: bytes, warm_up: bytes) -> dict:
    """`body` sent `args.repeats` times to a fresh server, after `warm_up` once, while /health is polled."""
    server = start_server(args)
    try:
        if post(server.port, "/predict", warm_up)[0] != 200:
            raise SystemExit("the warm-up request was not answered 200")
        reset_peak_memory(server.process.pid)
        at_rest = memory_mib(server.process.pid)["VmRSS"]
        answers = []
        with HealthPoller(server.port) as health:
            for _ in range(args.repeats):
                answers.append(post(server.port, "/predict", body))
        peak = memory_mib(server.process.pid)["VmHWM"]
    finally:
        server.stop()
    statuses = sorted({status for status, _, _ in answers})
    first_error = json.loads(answers[0][2]).get("errors", [{}])[0]
    return {
        "body": name,
        "mib": len(body) / 2**20,
        "statuses": statuses,
        "first_error": first_error,
        "slowest_answer_s": max(seconds for _, seconds, _ in answers),
        "worst_health_ms": health.worst_s * 1000,
        "health_failures": health.failures,
        "rss_at_rest_mib": at_rest,
        "rss_peak_mib": peak,
    }


def open_mid_body(port: int, count: int) -> list[socket.socket]:
    """`count` connections, each with a /predict request's headers and the start of its 1,000-byte body."""
    head = (
        "POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    ).encode()
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(head + PARTIAL_BODY)
        clients.append(client)
    return clients


def measure_stalled(port: int, count: int, wait_s: float) -> dict:
    """Opens `count` stalled connections, then waits up to `wait_s` for the server to answer and close each."""
    selector = selectors.DefaultSelector()
    start = time.perf_counter()
    received: dict[socket.socket, bytes] = {}
    for client in open_mid_body(port, count):
        client.setblocking(False)
        selector.register(client, selectors.EVENT_READ)
        received[client] = b""
    closed_after: list[float] = []
    deadline = start + wait_s
    while len(closed_after) < count and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=0.1):
            data = key.fileobj.recv(65536)
            received[key.fileobj] += data
            if not data:  # the server closed the connection
                closed_after.append(time.perf_counter() - start)
                selector.unregister(key.fileobj)
    statuses = [answer.split(b" ", 2)[1].decode() if answer else "none" for answer in received.values()]
    for client in received:
        client.close()
    return {
        "closed": len(closed_after),
        "answered_408": statuses.count("408"),
        "closed_median_s": statistics.median(closed_after) if closed_after else None,
        "closed_max_s": max(closed_after) if closed_after else None,
    }


def get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()


def predict_counts(port: int) -> dict[str, float]:
    """dfkd_http_requests_total{route="/predict"} by status label, from /metrics."""
    counts = {}
    for line in get(port, "/metrics").decode().splitlines():
        if line.startswith('dfkd_http_requests_total{route="/predict"'):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = float(line.rsplit(" ", 1)[1])
    return counts


def measure_disconnected(port: int, count: int) -> dict:
    """`count` clients close their connection mid-body; what /metrics counts of them once the server is done."""
    before = predict_counts(port)
    for client in open_mid_body(port, count):
        client.close()
    deadline = time.monotonic() + 10
    while True:
        counts = predict_counts(port)
        added = {status: counts[status] - before.get(status, 0) for status in counts}
        if sum(added.values()) >= count or time.monotonic() > deadline:
            return {status: int(value) for status, value in added.items() if value}
        time.sleep(0.1)


def measure_connections(args: argparse.Namespace) -> dict:
    server = start_server(args, "--body-timeout", f"{args.body_timeout:g}")
    try:
        with HealthPoller(server.port) as health:
            stalled = measure_stalled(server.port, args.connections, wait_s=args.body_timeout + 10)
        disconnected = measure_disconnected(server.port, args.connections)
        time.sleep(0.5)  # for the log to be written
    finally:
        server.stop()
    server.log.seek(0)
    log = server.log.read().decode(errors="replace")
    return {
        "stalled": stalled | {"worst_health_ms": health.worst_s * 1000},
        "disconnected": disconnected,
        "tracebacks": log.count("Traceback"),
    }


def body_table(results: list[dict]) -> str:
    lines = [
        "| body | MiB | answer (first error's field) | slowest answer s | worst /health ms "
        "| server RSS at rest MiB | peak MiB |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        field = f" ({r['first_error']['field']})" if r["first_error"] else ""
        failed = f", {r['health_failures']} failed" if r["health_failures"] else ""
        lines.append(
            f"| {r['body']} | {r['mib']:.2f} | {', '.join(map(str, r['statuses']))}{field} | {r['slowest_answer_s']:.3f} "
            f"| {r['worst_health_ms']:.1f}{failed} | {r['rss_at_rest_mib']:.0f} | {r['rss_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def connections_text(result: dict, count: int, timeout: float) -> list[str]:
    stalled, disconnected = result["stalled"], result["disconnected"]
    if stalled["closed"]:
        closed = (f"{stalled['closed']} closed by the server, after {stalled['closed_median_s']:.2f} s (median) "
                  f"and {stalled['closed_max_s']:.2f} s at most")
    else:
        closed = "none closed"
    counted = ", ".join(f"{status}: {value}" for status, value in sorted(disconnected.items())) or "nothing"
    return [
        f"- {count} connections stalled mid-body (`--body-timeout {timeout:g}`): {stalled['answered_408']} answered 408, "
        f"{closed} (waited {timeout + 10:g} s); worst /health meanwhile {stalled['worst_health_ms']:.1f} ms.",
        f"- {count} clients that closed their connection mid-body: /metrics counted, for /predict, {counted}.",
        f"- Tracebacks in the server's log over both: {result['tracebacks']}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=PROJECT / "models" / "student.onnx")
    parser.add_argument("--repeats", type=int, default=3, help="times each body is sent")
    parser.add_argument("--connections", type=int, default=300, help="stalled, then disconnecting, clients")
    parser.add_argument("--body-timeout", type=float, default=2.0, help="the server's --body-timeout for the stalled clients")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: no such ONNX file (the pipeline's export stage writes models/student.onnx)")
    load_at_start = os.getloadavg()[0]
    server = start_server(args)
    try:
        metadata = json.loads(get(server.port, "/metadata"))
    finally:
        server.stop()
    if metadata["channels"] != 1:
        raise SystemExit(f"{args.model}: the bodies here are grayscale images; serve a one-channel model")
    # A padding model also takes smaller squares (MNIST's 28x28 digits in a 32x32 input).
    sizes = [metadata["size"] - 4, metadata["size"]] if metadata["resize"] == "pad" else [metadata["size"]]
    bodies = request_bodies(metadata["max_batch"], sizes, metadata["max_body_bytes"])
    side = min(sizes)
    warm_up = json.dumps({"images": [[[0] * side] * side]}).encode()
    results = []
    for name, body in bodies.items():
        results.append(measure_body(args, name, body, warm_up))
        r = results[-1]
        print(f"{name:50s} {r['statuses']} slowest {r['slowest_answer_s']:.3f} s, worst /health "
              f"{r['worst_health_ms']:.1f} ms, RSS {r['rss_at_rest_mib']:.0f} -> {r['rss_peak_mib']:.0f} MiB", flush=True)
    connections = measure_connections(args)
    text = "\n".join([
        "## HTTP serving under abuse (`benchmarks/serving_abuse.py`)",
        "",
        f"{date.today().isoformat()} on {machine()}. `python -m serving` on loopback with its default limits",
        f"(--max-batch {metadata['max_batch']}, --max-body-bytes {metadata['max_body_bytes']}), on `{args.model.name}`",
        f"(sha256 {metadata['sha256'][:12]}...). Each body kind goes to a fresh server {args.repeats} times, one after",
        "another, while another connection asks /health every 5 ms; peak RSS is the server's VmHWM, reset after",
        "start-up and a one-image warm-up request. The valid batches are the reference: what an abusive body",
        f"costs should stay within a small multiple of theirs. Load average when the run started: {load_at_start:.2f}.",
        "",
        body_table(results),
        "",
        *connections_text(connections, args.connections, args.body_timeout),
    ])
    print("\n" + text)
    if not args.no_write:
        write_section("serving-abuse", text)


if __name__ == "__main__":
    main()
