import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Seconds, not minutes: every stage runs for real, on a handful of steps.
TINY_PARAMS = {
    "train_teacher": {"epochs": 2},
    "synthesize": {
        "dafl": {"steps": 6, "batch_size": 32, "generator_width": 8},
        "zskd": {"impressions": 40, "batch_size": 20, "steps": 5},  # used once a test selects zskd
        "deepinversion": {"images": 40, "batch_size": 20, "steps": 5},  # with a batch-norm teacher
        "dfad": {"batch_size": 32, "generator_width": 8},
        "fast_dfkd": {"batch_size": 16, "generator_width": 8, "latent_dim": 16, "warmup_rounds": 2, "inner_steps": 2,
                      "student_steps": 4},
    },
    "distill": {
        "batch_size": 64, "dafl": {"steps": 12, "pool_size": 256}, "zskd": {"steps": 12}, "deepinversion": {"steps": 12},
        "dfad": {"steps": 12}, "fast_dfkd": {"steps": 12},
    },
    "evaluate": {"latency_repeats": 3},
}


def environment(**env) -> dict[str, str]:
    """The environment of a stage run by a test: this virtualenv first, no tracking settings of ours."""
    variables = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DFKD_"))}
    return {**variables, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1", **env}


def run(command: list[str], cwd: Path, check: bool = True, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=environment(**env), capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(condition: Callable[[], object], timeout: float = 120) -> None:
    """Poll `condition` until it holds, for what another process does in its own time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return base


def set_params(project: Path, update: dict) -> None:
    """Merge `update` into the project's params.yaml."""
    params = merge(yaml.safe_load((project / "params.yaml").read_text()), update)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(destination: Path, params_update: dict) -> Path:
    """The project's files (tracked or not yet, never ignored ones) in a fresh git repository, as
    before any run: without the dvc.lock and the .gitignore files beside outputs that a `make run`
    has DVC write and stage."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT, capture_output=True, text=True, check=True,
    ).stdout.split()
    written_by_runs = {"dvc.lock"} | {name for name in listed if name.endswith("/.gitignore") and name != ".dvc/.gitignore"}
    for name in listed:
        source = PROJECT / name
        if source.is_file() and name not in written_by_runs:
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    set_params(destination, params_update)
    for command in (
        ["git", "init", "-q"],
        # Its own identity: `dvc exp run` commits, and a fresh machine has no global one.
        ["git", "config", "user.name", "dfkd tests"],
        ["git", "config", "user.email", "tests@localhost"],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "copy"],
    ):
        run(command, destination)
    return destination


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A copy of the project, tiny params, after one real `dvc repro` of the whole pipeline."""
    root = copy_project(tmp_path_factory.mktemp("project"), TINY_PARAMS)
    run([str(BIN / "dvc"), "repro"], root)
    return root
