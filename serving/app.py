"""The FastAPI application: /predict, /health, /ready, /metadata, /metrics.

Every bad request is answered with a 4xx JSON body `{"errors": [{"field": ..., "problem": ...}]}`
naming the request field and what is wrong with it; nothing a client sends can stop the server.
What a bad body costs in time and memory is bounded by what the largest valid batch costs (see
`json_images`; the uploads' sizes are read from their headers and checked before any is decoded); a body
must arrive within `body_timeout` seconds; a client that disconnects mid-body is counted in /metrics
under the status label "client_disconnected".
Checks and inference run inline on the event loop: a batch-1 forward pass takes tens of
microseconds, less than handing it to a thread would cost, and the largest body blocks the loop for
tens of milliseconds (benchmarks/serving_abuse.py), mostly parsing it, which holds the GIL anyway;
uploads of `max_upload_pixels` in all take about 0.1 s to decode and resize.
"""

import asyncio
import io
import json
import os
import sys
import time
from contextlib import asynccontextmanager
from itertools import chain
from pathlib import Path

import numpy as np
import pydantic_core
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from serving.model import Classifier, InputSpec, ModelSource, default_threads

PIXEL_SCALES = {"0-255": 255.0, "0-1": 1.0}
UPLOAD_FORMATS = ["PNG", "JPEG"]
UPLOAD_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK"}  # 8-bit modes; Pillow converts each to L and to RGB
MAX_REPORTED_PROBLEMS = 20
PIXEL_TYPES = {int, float}  # what a parsed JSON number is (bool is a type of its own)
JSON_TYPE_NAMES = {list: "an array", dict: "an object", str: "a string", int: "a number", float: "a number"}
CLIENT_DISCONNECTED = "client_disconnected"  # the status label of a request whose client left mid-body
WORKER_CONFIG_ENV = "DFKD_SERVING_WORKER_CONFIG"  # how `python -m serving --workers N` configures its workers

REQUESTS = Counter(
    "dfkd_http_requests_total",
    f"HTTP requests by route and status code ('{CLIENT_DISCONNECTED}': the client left mid-body)",
    ["route", "status"],
)
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
    max_upload_pixels: int = Field(
        2048 * 2048, ge=1, description="most pixels (width x height, summed) of the images uploaded in one /predict "
        "request, read from their headers before any is decoded"
    )
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a /predict request body may take to arrive in full; "
        "a slower one is answered 408 and its connection closed"
    )
    access_log: bool = Field(False, description="log every request (the /metrics counters are kept either way)")


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
    channels: int = Field(description="1: grayscale, 3: RGB")
    size: int = Field(description="the side of the square images the model takes")
    mean: list[float] = Field(description="per channel, of pixel values in [0, 1]; the model takes (x - mean) / std")
    std: list[float]
    class_names: list[str]
    resize: str = Field(description="how an upload of another side is brought to size: 'pad' (a smaller square "
                        "is zero-padded, centred; any other is resized bilinearly) or 'bilinear'")
    max_batch: int
    max_body_bytes: int
    max_upload_pixels: int
    onnxruntime_threads: int


class RequestProblem(Exception):
    """A bad request: answered with `status` and the problems, each naming its field."""

    def __init__(self, status: int, problems: list[tuple[str, str]], close_connection: bool = False):
        self.status = status
        self.problems = problems
        self.close_connection = close_connection


def error_response(status: int, problems: list[tuple[str, str]], close_connection: bool = False) -> JSONResponse:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    if len(problems) > len(shown):
        shown.append(("body", f"and {len(problems) - len(shown)} more problems"))
    headers = {"connection": "close"} if close_connection else None  # uvicorn closes the connection after it
    return JSONResponse({"errors": [{"field": field, "problem": problem} for field, problem in shown]}, status, headers)


def describe(value) -> str:
    """A parsed JSON value for an error message: the value itself when it is short, else its JSON type."""
    if type(value) not in (list, dict) and len(text := json.dumps(value)) <= 24:
        return text
    return JSON_TYPE_NAMES[type(value)]


def array_shapes(spec: InputSpec) -> str:
    """The arrays a JSON image may be, in words, for error messages and the OpenAPI description."""
    side = "S" if len(spec.sides) > 1 else str(spec.size)
    shapes = [f"({side}, {side})", f"({side}, {side}, 1)"] if spec.channels == 1 else [f"({side}, {side}, 3)"]
    sides = f" with S from {spec.sides[0]} to {spec.size}" if len(spec.sides) > 1 else ""
    return " or ".join(shapes) + sides


def json_images_schema(spec: InputSpec, max_batch: int, max_value: float) -> dict:
    number = {"type": "number", "minimum": 0, "maximum": max_value}
    channel_values = {"type": "array", "minItems": spec.channels, "maxItems": spec.channels, "items": number}
    pixel_forms = [number, channel_values] if spec.channels == 1 else [channel_values]
    # The model's own side first, as most images are: a validator tries the alternatives in order.
    squares = [{"minItems": side, "maxItems": side, "items": {"minItems": side, "maxItems": side}}
               for side in reversed(spec.sides)]
    image = {
        "type": "array",
        "items": {"type": "array"},
        # A square of an accepted side whose pixels are all of one form: two conditions, so that a validator
        # checks each pixel once per form, not once per side and form.
        "allOf": [{"anyOf": squares}, {"anyOf": [{"items": {"items": pixel}} for pixel in pixel_forms]}],
    }
    return {"type": "array", "minItems": 1, "maxItems": max_batch, "items": image}


def request_body_openapi(spec: InputSpec, max_batch: int, max_upload_pixels: int) -> dict:
    """The /predict request body exactly as `json_images` and `uploaded_images` accept it."""
    colour = "grayscale" if spec.channels == 1 else "RGB"
    pixel = "pixels" if spec.channels == 1 else "[R, G, B] pixels"
    square = f"{spec.size}x{spec.size}"
    resized = f"resized to {square} with Pillow's bilinear filter"
    if spec.resize == "pad":
        padded = f"; a square smaller than {square} is zero-padded, centred"
        fitted = f"zero-padded, centred, to {square} when square and no larger, else {resized}"
    else:
        padded, fitted = "", resized
    json_schema = {
        "type": "object",
        "properties": {
            "images": json_images_schema(spec, max_batch, 255) | {
                "description": f"a batch of {colour} images, each an array {array_shapes(spec)} (rows of {pixel}) "
                f"in the model's shape: arrays are never resized{padded}"
            },
            "pixel_scale": {
                "enum": list(PIXEL_SCALES),
                "default": "0-255",
                "description": "0-255: raw 8-bit values (as an image decoder gives); 0-1: already divided by 255",
            },
        },
        "required": ["images"],
        "additionalProperties": False,
        "if": {"properties": {"pixel_scale": {"const": "0-1"}}, "required": ["pixel_scale"]},
        "then": {"properties": {"images": json_images_schema(spec, max_batch, 1)}},
    }
    upload_schema = {
        "type": "object",
        "properties": {
            "image": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_batch,
                "items": {"type": "string", "format": "binary"},
                "description": f"one or more 8-bit PNG or JPEG files of any size and mode, at most {max_upload_pixels} "
                f"pixels in all: each converted to {colour} and {fitted}",
            }
        },
        "required": ["image"],
    }
    return {
        "required": True,
        "content": {"application/json": {"schema": json_schema}, "multipart/form-data": {"schema": upload_schema}},
    }


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes, and with 408 when
    it has not arrived in full `timeout` seconds after its headers: a stalled client holds no connection."""
    too_large = RequestProblem(413, [("body", f"request body is over the limit of {limit} bytes")])
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        problem = f"the request body did not arrive within {timeout:g} s ({size} bytes came)"
        raise RequestProblem(408, [("body", problem)], close_connection=True) from None
    return b"".join(chunks)


def json_value_limit(spec: InputSpec, max_batch: int) -> int:
    """More commas and opening brackets than the largest valid JSON body holds: an image of side S sent
    as (S, S, C), its largest form (a bracket and C - 1 commas per pixel), has fewer than (C + 1)(S + 1)^2.
    An upper bound on the values a valid body can hold."""
    return max_batch * (spec.channels + 1) * (spec.size + 1) ** 2 + 8


def json_images(body: bytes, spec: InputSpec, max_batch: int) -> list[np.ndarray]:
    """Parse and check a JSON /predict body; return each image as float32 (S, S, C) in 0..1.

    What a bad body can cost is bounded by what the largest valid one costs: its values are counted
    before it is parsed, the batch size and each image's shape are checked before any pixel, and an
    image reports only its first bad value (one problem per image at most).
    """
    limit = json_value_limit(spec, max_batch)
    if sum(body.count(mark) for mark in (b",", b"[", b"{")) > limit:
        raise RequestProblem(422, [("body", f"more JSON values than a batch of {max_batch} images can hold ({limit})")])
    try:
        parsed = pydantic_core.from_json(body)  # jiter: parses floats 5x faster than json.loads; nesting is limited
    except ValueError as error:
        raise RequestProblem(422, [("body", f"not valid JSON: {error}")]) from None
    if type(parsed) is not dict:
        raise RequestProblem(422, [("body", f"expected a JSON object with 'images', got {describe(parsed)}")])
    problems = [(key, "unknown field: send 'images' and optionally 'pixel_scale'")
                for key in parsed if key not in ("images", "pixel_scale")]
    pixel_scale = parsed.get("pixel_scale", "0-255")
    if type(pixel_scale) is not str or pixel_scale not in PIXEL_SCALES:
        problems.append(("pixel_scale", f"expected one of {', '.join(PIXEL_SCALES)}, got {describe(pixel_scale)}"))
    images = parsed.get("images")
    if "images" not in parsed:
        problems.append(("images", "missing: send a batch of images"))
    elif type(images) is not list:
        problems.append(("images", f"expected an array of images, got {describe(images)}"))
    elif not images:
        problems.append(("images", "empty batch: send at least one image"))
    elif len(images) > max_batch:
        problems.append(("images", f"{len(images)} images is over the maximum batch of {max_batch}"))
    if problems:
        raise RequestProblem(422, problems)
    checked = []
    for index, rows in enumerate(images):
        try:
            checked.append(json_image_pixels(rows, f"images[{index}]", spec, pixel_scale))
        except RequestProblem as error:
            problems.extend(error.problems)
    if problems:
        raise RequestProblem(422, problems)
    return checked


def json_image_pixels(rows, field: str, spec: InputSpec, pixel_scale: str) -> np.ndarray:
    """One parsed JSON image as float32 (S, S, C) in 0..1: its shape checked first, then its values' types,
    then their range; a bad image raises RequestProblem naming its first bad value."""
    values = accepted_array_values(rows, spec)
    if values is None:
        raise RequestProblem(422, [(field, f"expected an array {array_shapes(spec)}, got {shape_of(rows)}")])
    if not set(map(type, values)) <= PIXEL_TYPES:
        position, value = first_value(rows, lambda value: type(value) not in PIXEL_TYPES)
        raise RequestProblem(422, [(field + position, f"expected a number, got {describe(value)}")])
    try:
        array = np.asarray(rows, dtype=np.float64)
    except OverflowError:  # an integer beyond float64's range
        array = None
    if array is None or not np.isfinite(array).all():
        # NaN, an infinity or an integer beyond float64: `not abs(value) <= max` holds for all three
        position, value = first_value(rows, lambda value: not abs(value) <= sys.float_info.max)
        raise RequestProblem(422, [(field + position, f"expected a finite number, got {describe(value)}")])
    scale = PIXEL_SCALES[pixel_scale]
    low, high = array.min(), array.max()
    if low < 0 or high > scale:
        raise RequestProblem(422, [(field, f"pixel values must lie in [0, {scale:g}] with pixel_scale "
                                           f"'{pixel_scale}', found {low:g} to {high:g}")])
    array = array.astype(np.float32).reshape(len(rows), len(rows), spec.channels)  # divided in float32, as the pipeline does
    return array / scale if scale != 1 else array


def accepted_array_values(rows, spec: InputSpec) -> list | None:
    """The pixel values, in order, of an image that is one of the accepted arrays (a side in `spec.sides`;
    (S, S) or (S, S, C)); None for any other shape. Each check runs at C speed but the one over rows."""
    side = len(rows) if type(rows) is list else None
    if side not in spec.sides or not all(type(row) is list and len(row) == side for row in rows):
        return None
    pixels = list(chain.from_iterable(rows))
    pixel_types = set(map(type, pixels))
    if pixel_types == {list}:  # (S, S, C)
        return list(chain.from_iterable(pixels)) if set(map(len, pixels)) == {spec.channels} else None
    return pixels if spec.channels == 1 and list not in pixel_types else None  # (S, S)


def first_value(rows: list[list], is_bad) -> tuple[str, object]:
    """`[y][x]` or `[y][x][c]`, and the value, of an accepted array's first value for which is_bad(value)
    holds: a Python loop, run only on a bad image."""
    return next((position, value) for position, value in positioned_values(rows) if is_bad(value))


def positioned_values(rows: list[list]):
    """(position, value) of each pixel value of an accepted array, row by row."""
    for y, row in enumerate(rows):
        for x, pixel in enumerate(row):
            if type(pixel) is list:
                yield from ((f"[{y}][{x}][{c}]", value) for c, value in enumerate(pixel))
            else:
                yield f"[{y}][{x}]", pixel


def shape_of(rows) -> str:
    """What an image that is not one of the accepted arrays is, for its error message."""
    if type(rows) is not list:
        return describe(rows)
    if not rows:
        return "an empty array"
    if not all(type(row) is list for row in rows):
        return f"an array of {len(rows)} items, not all arrays"
    lengths = sorted({len(row) for row in rows})
    if len(lengths) != 1:
        return f"{len(rows)} rows of length {lengths}"
    pixels = list(chain.from_iterable(rows))
    if not any(type(pixel) is list for pixel in pixels):
        return f"an array ({len(rows)}, {lengths[0]})"
    if not all(type(pixel) is list for pixel in pixels):
        return f"({len(rows)}, {lengths[0]}) items, some arrays and some not"
    depths = sorted({len(pixel) for pixel in pixels})
    if len(depths) != 1:
        return f"({len(rows)}, {lengths[0]}) pixels of {depths} values"
    return f"an array ({len(rows)}, {lengths[0]}, {depths[0]})"


def open_upload(data: bytes, field: str) -> Image.Image:
    """One uploaded PNG or JPEG, its header read and its mode checked; its pixels are not decoded yet."""
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        raise RequestProblem(422, [(field, "not a PNG or JPEG image")]) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # Pillow on a damaged file
        raise RequestProblem(422, [(field, f"damaged image ({error})")]) from None
    if image.mode not in UPLOAD_MODES:
        raise RequestProblem(422, [(field, f"{image.format} mode {image.mode} is not supported: send an 8-bit image")])
    return image


def upload_pixels(image: Image.Image, field: str, spec: InputSpec) -> np.ndarray:
    """An opened upload as float32 (S, S, C) in 0..1 (or a smaller square, which `preprocess` pads, with
    resize "pad"): decoded, converted to the model's channels and, unless it fits as it is, resized to
    the model's side."""
    width, height = image.size
    try:
        converted = image.convert("L" if spec.channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError) as error:  # Pillow on a file damaged past its header
        raise RequestProblem(422, [(field, f"damaged image ({error})")]) from None
    if not (width == height and width in spec.sides):
        converted = converted.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.float32) / 255.0
    return pixels.reshape(*pixels.shape[:2], spec.channels)


async def uploaded_images(request: Request, body: bytes, spec: InputSpec, settings: ServeSettings) -> list[np.ndarray]:
    """Every upload's header is read, and their pixels counted, before any is decoded: what decoding costs
    is bounded by `max_upload_pixels`, however small the files are (a black 2048x2048 PNG is 4 KB)."""
    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=settings.max_batch, max_fields=settings.max_batch)
    except HTTPException as error:  # Starlette's answer to a malformed or oversized form
        raise RequestProblem(422, [("body", f"malformed multipart form: {error.detail}")]) from None
    unknown = sorted(set(form.keys()) - {"image"})
    if unknown:
        raise RequestProblem(422, [(key, "unknown form field: send the PNG or JPEG files as 'image'") for key in unknown])
    uploads = form.getlist("image")
    if not uploads:
        raise RequestProblem(422, [("image", "no file: send one or more PNG or JPEG files as 'image'")])
    opened, pixels = [], 0
    for index, upload in enumerate(uploads):
        field = f"image[{index}]"
        if isinstance(upload, str):
            raise RequestProblem(422, [(field, "expected a file upload, got a text field")])
        image = open_upload(await upload.read(), field)
        width, height = image.size
        pixels += width * height
        if pixels > settings.max_upload_pixels:
            problem = (f"{width}x{height}: the uploads hold {pixels} pixels up to this one, over the limit of "
                       f"{settings.max_upload_pixels} per request")
            raise RequestProblem(422, [(field, problem)])
        opened.append((field, image))
    return [upload_pixels(image, field, spec) for field, image in opened]


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
        except ClientDisconnect:
            # The client closed its connection before its body was read: there is no one to answer and
            # nothing failed here, so it is counted under its own label and not logged as an error.
            status = CLIENT_DISCONNECTED
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

    spec = classifier.spec
    app = FastAPI(
        title="Data-free distilled student",
        version="1",
        description=f"Classifies {'grayscale' if spec.channels == 1 else 'RGB'} {spec.size}x{spec.size} images into "
        f"{len(spec.class_names)} classes with the ONNX student exported by the pipeline. "
        'Every 4xx answer is `{"errors": [{"field", "problem"}]}`.',
        lifespan=lifespan,
    )
    bad_request = {"model": ErrorResponse}

    @app.exception_handler(RequestProblem)
    async def request_problem(request: Request, error: RequestProblem) -> JSONResponse:
        return error_response(error.status, error.problems, error.close_connection)

    @app.exception_handler(HTTPException)
    async def http_problem(request: Request, error: HTTPException) -> JSONResponse:
        field = "method" if error.status_code == 405 else "path"
        return error_response(error.status_code, [(field, f"{error.detail}: {request.method} {request.url.path}")])

    @app.post(
        "/predict",
        response_model=PredictResponse,
        summary="Classify a batch of images (JSON arrays, or PNG or JPEG uploads)",
        responses={408: bad_request, 413: bad_request, 415: bad_request, 422: bad_request},
        openapi_extra={"requestBody": request_body_openapi(spec, settings.max_batch, settings.max_upload_pixels)},
    )
    async def predict(request: Request) -> PredictResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/json", "multipart/form-data"):
            raise RequestProblem(
                415, [("content-type", f"expected application/json or multipart/form-data, got '{content_type}'")]
            )
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout)
        if content_type == "application/json":
            images = json_images(body, spec, settings.max_batch)
        else:
            images = await uploaded_images(request, body, spec, settings)
        probabilities = classifier.probabilities(classifier.preprocess(images))
        IMAGES.inc(len(images))
        BATCH_SIZE.observe(len(images))
        best = probabilities.argmax(axis=1).tolist()
        return PredictResponse(
            predictions=[
                Prediction(class_index=index, class_name=spec.class_names[index], probabilities=row)
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
            channels=spec.channels,
            size=spec.size,
            mean=list(spec.mean),
            std=list(spec.std),
            class_names=list(spec.class_names),
            resize=spec.resize,
            max_batch=settings.max_batch,
            max_body_bytes=settings.max_body_bytes,
            max_upload_pixels=settings.max_upload_pixels,
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
