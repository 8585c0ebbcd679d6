"""What every training stage does the same way: seed, pick the device, set CPU threads, load splits,
keep its resume state."""

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from dvc.dependency import ParamsDependency
from dvc.repo import Repo

from dfkd.amalgamation import AmalgamationError
from dfkd.checkpoint import CheckpointError, OutputError, ResumeState
from dfkd.data import DataError, load_split, to_model_input
from dfkd.distributed import join, launched
from dfkd.export import ParityError
from dfkd.inputs import InputSpec
from dfkd.runtime import DivergedError, resolve_device, seed_everything
from dfkd.teacher import TeacherError
from stages.params import ROOT, Params, ParamsError, load_params
from stages.tracking import TrackingError

PREPARED = ROOT / "data" / "prepared"
MODELS = ROOT / "models"
REPORTS = ROOT / "reports"
RESUME = ROOT / ".resume"  # mid-stage training state; outside DVC's outputs, so DVC never deletes it


def setup(params: Params) -> torch.device:
    """Threads, seed and device of a training stage; under torchrun, also join its process group.
    Every rank takes the same seed: the loops that split a batch rely on it (dfkd/distributed.py)."""
    # One intra-op thread per core, shared by the processes of this machine; torch's default
    # oversubscribes small CPU machines.
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_processes))
    seed_everything(params.seed)
    return join(resolve_device(params.device))


def launch_data_parallel() -> None:
    """Start this stage again as the processes `distributed` in params.yaml asks for, replacing this
    process by torchrun, which starts one copy per process and ends them all if one fails; return
    at once when one process is asked for, or when this is already one of torchrun's."""
    params = load_params()
    settings = params.distributed
    if settings.processes * settings.nodes == 1 or launched():
        return
    device = resolve_device(params.device)
    cores = len(os.sched_getaffinity(0))
    available, kind = (torch.cuda.device_count(), "GPUs") if device.type == "cuda" else (cores, "CPU cores")
    if settings.processes > available:
        raise ParamsError(
            f"params.yaml: distributed.processes is {settings.processes}, more than the {available} {kind} of "
            "this machine (one process per GPU, or per core on the CPU)"
        )
    module = sys.modules["__main__"].__spec__.name
    meeting = ["--standalone"] if settings.nodes == 1 else [
        "--nnodes", str(settings.nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", settings.rendezvous,
        "--rdzv-id", module,
    ]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(settings.processes), *meeting,
        "--local-ranks-filter", "0", "-m", module, *sys.argv[1:],
    ]
    # Set, torchrun keeps it instead of setting 1 with a warning; setup sets the threads itself.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // settings.processes)))
    sys.stdout.flush()
    os.execv(sys.executable, command)


def dataset_description() -> dict:
    """What prepare wrote of the data: class names, channels, side and pixel statistics."""
    path = PREPARED / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: does not exist (run the prepare stage first)")
    return json.loads(path.read_text())


def data_spec(size: int) -> InputSpec:
    """The input of a classifier trained here on the prepared data, at side `size`."""
    data = dataset_description()
    return InputSpec(
        channels=data["channels"], size=size, mean=data["mean"], std=data["std"], class_names=data["class_names"],
        resize="pad" if data["side"] < size else "bilinear",
    )


def class_index(data_classes: list[str], spec: InputSpec, source: str) -> torch.Tensor:
    """For each class of the data, the index of the teacher's output of that name."""
    unknown = [name for name in data_classes if name not in spec.class_names]
    if unknown:
        raise DataError(
            f"{source}: classes in the data that the teacher does not have: {unknown} "
            f"(the teacher's: {list(spec.class_names)})"
        )
    return torch.tensor([spec.class_names.index(name) for name in data_classes])


def load_model_input(split_name: str, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared split as images preprocessed for a model of input `spec`, and labels as that
    model's class indices (matched by class name)."""
    path = PREPARED / f"{split_name}.npz"
    split = load_split(path)
    labels = class_index(dataset_description()["class_names"], spec, str(path))[torch.as_tensor(split.labels)]
    return to_model_input(split.images, spec), labels


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a directory's file names and contents; 'missing' if there is neither."""
    if path.is_file():
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    # Bytecode caches are left out: Python writes them when it imports a module, not when its code changes.
    for file in sorted(found.relative_to(path) for found in path.rglob("*") if found.is_file()):
        if "__pycache__" not in file.parts:
            digest.update(f"{file}\0{content_digest(path / file)}\n".encode())
    return digest.hexdigest()


def stage_inputs(stage: str) -> dict[str, str]:
    """Everything DVC stage `stage` reads, as DVC itself resolves its dvc.yaml (templating included):
    its command, the digest of each dependency and the value of each of its params."""
    with Repo(ROOT) as repo:
        found = [candidate for candidate in repo.index.stages if candidate.name == stage]
        if not found:
            raise LookupError(f"no DVC stage '{stage}' in this repository")
        inputs = {"cmd": str(found[0].cmd)}
        for dependency in found[0].deps:
            if isinstance(dependency, ParamsDependency):
                for key, value in dependency.read_params().items():
                    inputs[f"{dependency.def_path}:{key}"] = json.dumps(value, sort_keys=True)
            else:
                inputs[dependency.def_path] = content_digest(Path(dependency.fs_path))
    return inputs


def stage_resume(stage: str, every: int, file_name: str | None = None) -> ResumeState:
    """The resume state of DVC stage `stage` (.resume/<file_name or stage>.pt), saved every `every`
    steps; resumed only if everything the stage reads is as it was when the state was saved.

    DVC's own list is the one used: dvc.yaml already names exactly the code, data and params each
    stage reads, so a dependency added there is covered here too."""
    return ResumeState(RESUME / f"{file_name or stage}.pt", stage_inputs(stage), every, label=stage)


def run(main: Callable[[], None], data_parallel: bool = False) -> None:
    """Run a stage's main, as several processes if it is `data_parallel` and params.yaml asks for
    them (`launch_data_parallel`); bad input (params, data, checkpoints, a teacher that the synthesis
    method cannot use, teachers that cannot be amalgamated, ONNX parity), a loss that diverged, an
    output that cannot be written (disk full, read-only folder) or a tracking server that does not
    answer ends it with a one-line error naming the key, file or step and exit code 2, instead of a
    traceback; Ctrl-C, with one line and exit code 130."""
    try:
        if data_parallel:
            launch_data_parallel()
        main()
    except (
        ParamsError, DataError, CheckpointError, OutputError, TeacherError, AmalgamationError, ParityError, DivergedError,
        TrackingError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # its MLflow run is already ended KILLED (stages/tracking.py)
        print("interrupted (Ctrl-C); a rerun continues from the last state the stage saved in .resume/, if it "
              "keeps one", file=sys.stderr)
        sys.exit(130)
