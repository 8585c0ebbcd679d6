"""Docker cannot run here: check that everything each Dockerfile target references exists and is shipped."""

import fnmatch
import re
import shlex
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each build stage's (instruction, argument) pairs, its parent's first, by stage name."""
    text = (PROJECT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in lines:
        name, argument = line.split(None, 1)
        if name.upper() == "FROM":
            base, _, stage = argument.partition(" AS ")
            current = list(found.get(base.strip(), [])) + [("FROM", base.strip())]
            found[stage.strip()] = current
        else:
            current.append((name.upper(), argument))
    return found


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path (or a folder above it) decides."""
    ignored = False
    for pattern in (PROJECT / ".dockerignore").read_text().split():
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        parts = path.rstrip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) for prefix in prefixes):
            ignored = not negated
    return ignored


def pipeline_outputs() -> set[str]:
    """Files `make run` (dvc repro) produces before an image is built from them."""
    outs = set()
    for stage in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"].values():
        outs.update(out if isinstance(out, str) else next(iter(out)) for out in stage.get("outs", []))
    return outs


def copies(target: str) -> list[list[str]]:
    return [[word for word in shlex.split(argument) if not word.startswith("--")] for name, argument in stages()[target] if name == "COPY"]


def command(target: str, instruction: str) -> list[str]:
    (argument,) = [argument for name, argument in stages()[target] if name == instruction][-1:]
    return re.findall(r'"([^"]+)"', argument)


def test_both_targets_exist_and_the_pipeline_is_the_default():
    assert {"serving", "pipeline"} <= set(stages())
    assert list(stages())[-1] == "pipeline", "a plain `docker build .` builds the pipeline image, as before"


def test_every_copied_path_exists_or_is_a_pipeline_output_and_is_shipped():
    outputs = pipeline_outputs()
    for target in ("serving", "pipeline"):
        assert copies(target)
        for *sources, _destination in copies(target):
            for source in sources:
                assert (PROJECT / source).exists() or source in outputs, f"{target} copies {source}, which nothing makes"
                assert not dockerignored(source), f"{target} copies {source} but .dockerignore drops it"


def test_the_dockerignore_check_follows_dockers_exceptions():
    assert dockerignored("models/teacher.pt") and not dockerignored("models/student.onnx")
    assert dockerignored("dfkd/__pycache__") and not dockerignored("serving/")


def test_each_target_runs_a_module_it_copies():
    for target, module_at in (("serving", 2), ("pipeline", 2)):
        words = command(target, "CMD")
        assert words[:2] == ["python", "-m"]
        module_path = words[module_at].replace(".", "/")
        assert (PROJECT / module_path / "__main__.py").is_file() or (PROJECT / f"{module_path}.py").is_file()
        package = words[module_at].split(".")[0]
        assert any(source.rstrip("/") == package for *sources, _ in copies(target) for source in sources)


def test_the_serving_image_serves_the_copied_model_as_a_non_root_user_with_a_health_check():
    instructions = stages()["serving"]
    words = command("serving", "CMD")
    model = words[words.index("--model") + 1]
    assert any(destination == model for *_, destination in copies("serving"))
    assert [argument for name, argument in instructions if name == "USER"] == ["serving"]
    assert any(name == "RUN" and "useradd" in argument and "serving" in argument for name, argument in instructions)
    health = command("serving", "HEALTHCHECK")
    port = words[words.index("--port") + 1]
    assert f"http://127.0.0.1:{port}/ready" in " ".join(health)
    assert ("EXPOSE", port) in instructions


def test_the_serving_image_installs_the_serving_requirements_only():
    runs = " ".join(argument for name, argument in stages()["serving"] if name == "RUN")
    assert "--requirement requirements-serving.txt" in runs and "--requirement requirements.txt" not in runs
    serving_pins = (PROJECT / "requirements-serving.txt").read_text()
    assert not re.search(r"^(torch|mlflow|onnx|dvc|prefect)==", serving_pins, re.MULTILINE)
    # Everything the service imports (torch-free, checked in test_serving) comes from this list.
    for package in ("onnxruntime", "fastapi", "uvicorn", "pillow", "prometheus-client", "python-multipart", "numpy"):
        assert re.search(rf"^{package}==", serving_pins, re.MULTILINE), package


def test_every_version_is_pinned_once_and_the_full_list_includes_the_serving_one():
    full = (PROJECT / "requirements.txt").read_text()
    assert "-r requirements-serving.txt" in full.splitlines()
    pins = [
        line.split("==")[0].lower()
        for text in (full, (PROJECT / "requirements-serving.txt").read_text())
        for line in text.splitlines()
        if "==" in line and not line.startswith("#")
    ]
    assert len(pins) == len(set(pins)), "a package pinned in both files"


def test_the_pipeline_image_installs_the_pinned_torch_and_requirements():
    runs = " ".join(argument for name, argument in stages()["pipeline"] if name == "RUN")
    assert "--requirement requirements.txt" in runs
    copied = {source for *sources, _ in copies("pipeline") for source in sources}
    assert {"requirements.txt", "requirements-serving.txt"} <= copied, "requirements.txt includes the serving list"
    torch_pin = [line for line in (PROJECT / "requirements.txt").read_text().splitlines() if line.startswith("torch==")]
    assert torch_pin == ["torch==2.13.0"], "the Dockerfile reads the torch version from this pin"


def test_every_module_the_stages_need_is_copied_into_the_pipeline_image():
    copied = {source.rstrip("/") for *sources, _ in copies("pipeline") for source in sources}
    assert "amalgamation" in copied  # its dvc.yaml and the folder for users' own teachers
    pipelines = (PROJECT / "dvc.yaml").read_text() + (PROJECT / "amalgamation/dvc.yaml").read_text()
    for stage_command in re.findall(r"cmd: python -m ([\w.]+)", pipelines):
        package = stage_command.split(".")[0]
        assert package in copied, f"dvc.yaml runs {stage_command} but the image lacks {package}/"
    assert {"dfkd", "pipeline", "serving"} <= copied


def test_every_dvc_dependency_that_no_stage_makes_is_copied_into_the_pipeline_image():
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())

    def resolved(path: str) -> str:  # dvc.yaml's ${section.key} templating, from params.yaml
        def value(match: re.Match) -> str:
            found = params
            for key in match.group(1).split("."):
                found = found[key]
            return str(found)

        return re.sub(r"\$\{([\w.]+)\}", value, path)

    outputs = pipeline_outputs() | {
        out if isinstance(out, str) else next(iter(out))
        for stage in yaml.safe_load((PROJECT / "amalgamation/dvc.yaml").read_text())["stages"].values()
        for out in stage.get("outs", [])
    }
    copied = {source.rstrip("/") for *sources, _ in copies("pipeline") for source in sources}
    for dvc_file in ("dvc.yaml", "amalgamation/dvc.yaml"):
        for name, stage in yaml.safe_load((PROJECT / dvc_file).read_text())["stages"].items():
            for dep in map(resolved, stage["deps"]):
                made = any(dep == out or dep.startswith(f"{out}/") for out in outputs)
                shipped = any(dep == source or dep.startswith(f"{source}/") for source in copied)
                assert made or shipped, f"{dvc_file}:{name} depends on {dep}, which the pipeline image lacks"
                assert made or not dockerignored(dep), f"{dvc_file}:{name} depends on {dep}, which .dockerignore drops"
