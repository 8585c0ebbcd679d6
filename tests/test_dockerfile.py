"""Docker cannot run here: check that everything the Dockerfile references exists and is shipped."""

import re
import shlex
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    text = (PROJECT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_every_copied_path_exists_and_is_not_dockerignored():
    ignored = {line.strip() for line in (PROJECT / ".dockerignore").read_text().splitlines() if line.strip()}
    copies = [shlex.split(argument) for name, argument in instructions() if name == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert (PROJECT / source).exists(), f"Dockerfile copies {source}, which does not exist"
            assert source.rstrip("/") not in ignored, f"{source} is copied but .dockerignore drops it"


def test_the_default_command_is_a_module_that_exists():
    (command,) = [argument for name, argument in instructions() if name == "CMD"]
    python, flag, module = re.findall(r'"([^"]+)"', command)
    assert (python, flag) == ("python", "-m")
    assert (PROJECT / (module.replace(".", "/") + ".py")).is_file()


def test_the_image_installs_the_pinned_torch_and_requirements():
    runs = " ".join(argument for name, argument in instructions() if name == "RUN")
    assert "--requirement requirements.txt" in runs
    torch_pin = [line for line in (PROJECT / "requirements.txt").read_text().splitlines() if line.startswith("torch==")]
    assert torch_pin == ["torch==2.13.0"], "the Dockerfile reads the torch version from this pin"


def test_every_module_the_stages_need_is_copied():
    copied = " ".join(argument for name, argument in instructions() if name == "COPY")
    pipelines = (PROJECT / "dvc.yaml").read_text() + (PROJECT / "amalgamation/dvc.yaml").read_text()
    assert "amalgamation/" in copied
    for stage_command in re.findall(r"cmd: python -m ([\w.]+)", pipelines):
        package = stage_command.split(".")[0]
        assert f"{package}/" in copied, f"dvc.yaml runs {stage_command} but the image lacks {package}/"
    for package in ("dfkd", "pipeline"):
        assert f"{package}/" in copied
