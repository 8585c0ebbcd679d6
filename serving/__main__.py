"""Serve the ONNX student over HTTP.

    python -m serving --model models/student.onnx                  # the file the pipeline exported
    python -m serving --model models:/dfkd-student@champion        # the registry's promoted version
    python -m serving --model models/student.onnx --host 0.0.0.0 --port 8080 --workers 2

A registry URI is resolved against MLFLOW_TRACKING_URI, else the repository's mlflow.db, and the
version it names is downloaded once, before the workers start.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from serving.app import WORKER_CONFIG_ENV, ServeSettings, create_app
from serving.model import ModelSourceError, resolve_source


def parse_settings(argv: list[str] | None = None) -> ServeSettings:
    """One option per ServeSettings field, with its description and default; validated by pydantic."""
    parser = argparse.ArgumentParser(
        prog="python -m serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=field.description)
        elif field.is_required():
            parser.add_argument(flag, required=True, help=field.description)
        else:
            default = "" if field.default is None else f" (default: {field.default})"
            parser.add_argument(flag, default=field.default, help=field.description + default)
    args = parser.parse_args(argv)
    try:
        return ServeSettings(**vars(args))
    except ValidationError as error:
        problems = [f"--{'-'.join(str(p) for p in item['loc']).replace('_', '-')}: {item['msg']} (got {item['input']!r})"
                    for item in error.errors(include_url=False)]
        parser.error("; ".join(problems))


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    with tempfile.TemporaryDirectory(prefix="dfkd-serving-") as scratch:
        try:
            source = resolve_source(settings.model, Path(scratch))
            app = create_app(settings, source)  # loads and checks the model before the port opens
        except ModelSourceError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        version = f" version {source.version}" if source.version else ""
        print(f"serving {source.name}{version} from {source.path}", flush=True)
        options = {"host": settings.host, "port": settings.port, "access_log": settings.access_log}
        if settings.workers == 1:
            uvicorn.run(app, **options)
            return
        # Each worker process builds its own app and onnxruntime session from this description;
        # their Prometheus metrics meet in one directory.
        os.environ[WORKER_CONFIG_ENV] = json.dumps(
            {"settings": settings.model_dump(), "path": str(source.path), "name": source.name, "version": source.version}
        )
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(scratch, "metrics"))
        Path(scratch, "metrics").mkdir()
        uvicorn.run("serving.app:app_from_environment", factory=True, workers=settings.workers, **options)


if __name__ == "__main__":
    main()
