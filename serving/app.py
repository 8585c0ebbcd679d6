"""The FastAPI application: /predict, /health, /ready, /metadata, /metrics.

Every bad request is answered with a 4xx JSON body `{"errors": [{"field": ..., "problem": ...}]}`
naming the request field and what is wrong with it; nothing a client sends can stop the server.
Inference runs inline on the event loop: a batch-1 forward pass takes tens of microseconds, less
than handing it to a thread would cost.
"""

import io
import json
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, ValidationError
from starlette.exceptions import HTTPException

from serving.model import Classifier, ModelSource, default_threads

PIXEL_SCALES = {"0-255": 255.0, "0-1": 1.0}
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}  # 8-bit modes; Pillow's convert("L") makes them grayscale
MAX_REPORTED_PROBLEMS = 20
WORKER_CONFIG_ENV = "DFKD_SERVING_WORKER_CONFIG"  # how `python -m serving --workers N` configures its workers

REQUESTS = Counter("dfkd_http_requests_total", "HTTP requests by route and status code", ["route", "status"])
LATENCY = Histogram(
    "dfkd_http_request_duration_seconds",
    "Time from request to response, by route",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
IMAGES = Counter("dfkd_predicted_images_total", "Images classified")
BATCH_SIZE = Histogram("dfkd_predict_batch_size", "Images per /predict request", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class ServeSettings(BaseModel):
    """The service's settings; `python -m serving --help` lists them with these defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(description="ONNX file, or models:/<name>@<alias> or models:/<name>/<version> (MLflow registry)")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    workers: int = Field(1, ge=1, description="server processes, each with its own warmed-up onnxruntime session")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads per worker (default: cores // workers)")
    max_batch: int = Field(256, ge=1, description="most images in one /predict request")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="largest /predict request body, bytes")
    access_log: bool = Field(False, description="log every request (the /metrics counters are kept either way)")


Pixel = Annotated[float, Strict(), AllowInfNan(False)]


class PredictRequest(BaseModel):
    """The JSON body of /predict; the shape and range rules are checked after parsing (see `json_images`)."""

    model_config = ConfigDict(extra="forbid")
    images: list[list[list[Pixel]]]
    pixel_scale: Literal["0-255", "0-1"] = "0-255"


class Prediction(BaseModel):
    class_index: int
    class_name: str
    probabilities: list[float] = Field(description="softmax over the classes, in class_names order")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model_name: str
    model_version: str | None


class Problem(BaseModel):
    field: str
    problem: str


class ErrorResponse(BaseModel):
    errors: list[Problem]


class Metadata(BaseModel):
    name: str
    version: str | None = Field(description="registry version; null when served from a file")
    source: str
    sha256: str = Field(description="of the ONNX file")
    input_name: str
    input_shape: list[int | str]
    image_sizes: list[int] = Field(description="accepted square image sides; smaller ones are zero-padded")
    pixel_mean: float
    pixel_std: float
    class_names: list[str]
    max_batch: int
    max_body_bytes: int
    onnxruntime_threads: int


class RequestProblem(Exception):
    """A bad request: answered with `status` and the problems, each naming its field."""

    def __init__(self, status: int, problems: list[tuple[str, str]]):
        self.status = status
        self.problems = problems


def error_response(status: int, problems: list[tuple[str, str]]) -> JSONResponse:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    if len(problems) > len(shown):
        shown.append(("body", f"and {len(problems) - len(shown)} more problems"))
    return JSONResponse({"errors": [{"field": field, "problem": problem} for field, problem in shown]}, status)


def field_name(location: tuple) -> str:
    """('images', 0, 3) -> 'images[0][3]'; the whole body for a JSON syntax error."""
    name = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    return name or "body"


def square_images_schema(sizes: tuple[int, ...], max_batch: int, max_value: float) -> dict:
    def square(side: int) -> dict:
        row = {"type": "array", "minItems": side, "maxItems": side, "items": {"type": "number", "minimum": 0, "maximum": max_value}}
        return {"type": "array", "minItems": side, "maxItems": side, "items": row}

    return {"type": "array", "minItems": 1, "maxItems": max_batch, "items": {"anyOf": [square(side) for side in sizes]}}


def request_body_openapi(sizes: tuple[int, ...], max_batch: int) -> dict:
    """The /predict request body exactly as `json_images` and `png_images` accept it."""
    accepted = " or ".join(f"{side}x{side}" for side in sizes)
    json_schema = {
        "type": "object",
        "properties": {
            "images": square_images_schema(sizes, max_batch, 255) | {
                "description": f"a batch of grayscale images, each {accepted} (rows of pixel values); "
                "smaller ones are zero-padded to the model's input size"
            },
            "pixel_scale": {
                "enum": list(PIXEL_SCALES),
                "default": "0-255",
                "description": "0-255: raw 8-bit values (MNIST's IDX files); 0-1: already divided by 255",
            },
        },
        "required": ["images"],
        "additionalProperties": False,
        "if": {"properties": {"pixel_scale": {"const": "0-1"}}, "required": ["pixel_scale"]},
        "then": {"properties": {"images": square_images_schema(sizes, max_batch, 1)}},
    }
    png_schema = {
        "type": "object",
        "properties": {
            "image": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_batch,
                "items": {"type": "string", "format": "binary"},
                "description": f"one or more 8-bit PNG files, each {accepted}, converted to grayscale",
            }
        },
        "required": ["image"],
    }
    return {
        "required": True,
        "content": {"application/json": {"schema": json_schema}, "multipart/form-data": {"schema": png_schema}},
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = RequestProblem(413, [("body", f"request body is over the limit of {limit} bytes")])
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def json_images(body: bytes, sizes: tuple[int, ...], max_batch: int) -> list[np.ndarray]:
    """Parse and check a JSON /predict body; return each image as float32 (H, W) in 0..1."""
    try:
        parsed = PredictRequest.model_validate_json(body)
    except ValidationError as error:
        raise RequestProblem(
            422, [(field_name(item["loc"]), item["msg"]) for item in error.errors(include_url=False)]
        ) from None
    if not parsed.images:
        raise RequestProblem(422, [("images", "empty batch: send at least one image")])
    if len(parsed.images) > max_batch:
        raise RequestProblem(422, [("images", f"{len(parsed.images)} images is over the maximum batch of {max_batch}")])
    scale = PIXEL_SCALES[parsed.pixel_scale]
    accepted = " or ".join(f"{side}x{side}" for side in sizes)
    images, problems = [], []
    for index, rows in enumerate(parsed.images):
        side = len(rows)
        if side not in sizes or any(len(row) != side for row in rows):
            widths = sorted({len(row) for row in rows})
            problems.append((f"images[{index}]", f"expected a {accepted} array, got {side} rows of length {widths}"))
            continue
        pixels = np.asarray(rows, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0 or high > scale:
            problems.append(
                (f"images[{index}]", f"pixel values must lie in [0, {scale:g}] with pixel_scale "
                 f"'{parsed.pixel_scale}', found {low:g} to {high:g}")
            )
            continue
        images.append(pixels / scale if scale != 1 else pixels)
    if problems:
        raise RequestProblem(422, problems)
    return images


def png_pixels(data: bytes, field: str, sizes: tuple[int, ...]) -> np.ndarray:
    """One uploaded PNG as float32 (H, W) in 0..1, its size checked before it is decoded."""
    accepted = " or ".join(f"{side}x{side}" for side in sizes)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            width, height = image.size
            if width != height or width not in sizes:
                raise RequestProblem(422, [(field, f"expected a {accepted} image, got {width}x{height}")])
            if image.mode not in PNG_MODES:
                raise RequestProblem(422, [(field, f"PNG mode {image.mode} is not supported: send an 8-bit image")])
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise RequestProblem(422, [(field, "not a PNG image")]) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # Pillow on a damaged file
        raise RequestProblem(422, [(field, f"damaged PNG image ({error})")]) from None


async def png_images(request: Request, body: bytes, sizes: tuple[int, ...], max_batch: int) -> list[np.ndarray]:
    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_batch, max_fields=max_batch)
    except HTTPException as error:  # Starlette's answer to a malformed or oversized form
        raise RequestProblem(422, [("body", f"malformed multipart form: {error.detail}")]) from None
    unknown = sorted(set(form.keys()) - {"image"})
    if unknown:
        raise RequestProblem(422, [(key, "unknown form field: send the PNG files as 'image'") for key in unknown])
    uploads = form.getlist("image")
    if not uploads:
        raise RequestProblem(422, [("image", "no file: send one or more PNG files as 'image'")])
    images = []
    for index, upload in enumerate(uploads):
        field = f"image[{index}]"
        if isinstance(upload, str):
            raise RequestProblem(422, [(field, "expected a file upload, got a text field")])
        images.append(png_pixels(await upload.read(), field, sizes))
    return images


class MetricsMiddleware:
    """Counts and times every HTTP request by route and status (a plain ASGI middleware: cheap)."""

    def __init__(self, app, routes: set[str]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values
            REQUESTS.labels(route, str(status)).inc()
            LATENCY.labels(route).observe(time.perf_counter() - start)


def metrics_registry() -> CollectorRegistry:
    """With several workers each process writes its metrics to PROMETHEUS_MULTIPROC_DIR; /metrics sums them."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def create_app(settings: ServeSettings, source: ModelSource) -> FastAPI:
    threads = settings.threads or default_threads(settings.workers)
    classifier = Classifier(source, threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        classifier.warm_up()
        yield

    app = FastAPI(
        title="Data-free distilled MNIST student",
        version="1",
        description="Classifies 28x28 or 32x32 grayscale digits with the ONNX student exported by the pipeline. "
        'Every 4xx answer is `{"errors": [{"field", "problem"}]}`.',
        lifespan=lifespan,
    )
    bad_request = {"model": ErrorResponse}

    @app.exception_handler(RequestProblem)
    async def request_problem(request: Request, error: RequestProblem) -> JSONResponse:
        return error_response(error.status, error.problems)

    @app.exception_handler(HTTPException)
    async def http_problem(request: Request, error: HTTPException) -> JSONResponse:
        field = "method" if error.status_code == 405 else "path"
        return error_response(error.status_code, [(field, f"{error.detail}: {request.method} {request.url.path}")])

    @app.post(
        "/predict",
        response_model=PredictResponse,
        summary="Classify a batch of images (JSON arrays or PNG uploads)",
        responses={413: bad_request, 415: bad_request, 422: bad_request},
        openapi_extra={"requestBody": request_body_openapi(classifier.image_sizes, settings.max_batch)},
    )
    async def predict(request: Request) -> PredictResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/json", "multipart/form-data"):
            raise RequestProblem(
                415, [("content-type", f"expected application/json or multipart/form-data, got '{content_type}'")]
            )
        body = await read_body(request, settings.max_body_bytes)
        if content_type == "application/json":
            images = json_images(body, classifier.image_sizes, settings.max_batch)
        else:
            images = await png_images(request, body, classifier.image_sizes, settings.max_batch)
        probabilities = classifier.probabilities(classifier.preprocess(images))
        IMAGES.inc(len(images))
        BATCH_SIZE.observe(len(images))
        best = probabilities.argmax(axis=1).tolist()
        return PredictResponse(
            predictions=[
                Prediction(class_index=index, class_name=classifier.class_names[index], probabilities=row)
                for index, row in zip(best, probabilities.tolist())
            ],
            model_name=source.name,
            model_version=source.version,
        )

    @app.get("/health", summary="The process is alive")
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/ready", summary="The model is loaded and warmed up", responses={503: bad_request})
    async def ready() -> dict[str, str]:
        if not classifier.ready:
            raise RequestProblem(503, [("model", "still loading")])
        return {"status": "ready"}

    @app.get("/metadata", response_model=Metadata, summary="The served model")
    async def metadata() -> Metadata:
        return Metadata(
            name=source.name,
            version=source.version,
            source=settings.model,
            sha256=classifier.sha256,
            input_name=classifier.input_name,
            input_shape=classifier.input_shape,
            image_sizes=list(classifier.image_sizes),
            pixel_mean=classifier.pixel_mean,
            pixel_std=classifier.pixel_std,
            class_names=classifier.class_names,
            max_batch=settings.max_batch,
            max_body_bytes=settings.max_body_bytes,
            onnxruntime_threads=threads,
        )

    @app.get("/metrics", response_class=PlainTextResponse, summary="Request metrics, Prometheus text format")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics_registry()), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, routes={route.path for route in app.routes})
    return app


def app_from_environment() -> FastAPI:
    """The app of one worker process started by `python -m serving --workers N` (a uvicorn factory)."""
    config = json.loads(os.environ[WORKER_CONFIG_ENV])
    source = ModelSource(Path(config["path"]), config["name"], config["version"])
    return create_app(ServeSettings(**config["settings"]), source)
