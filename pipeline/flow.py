"""The pipeline as a Prefect flow: each DVC stage in order as a task, under one MLflow parent run,
then the quality gate that promotes the student to the serving alias only if it passes.

Each task runs `dvc repro --single-item <stage>`, so DVC still decides what is up to date and a
rerun with nothing changed finishes in seconds. Parameter overrides are applied to params.yaml the
way `dvc exp run -S key=value` applies them, after validation, before any stage starts.

The parent run always describes the files on disk: a stage that DVC finds up to date, or restores
from its run-cache, logs nothing of its own, so the flow logs the headline metrics of the metrics
file itself and tags the parent with the stages it reused; the gate finds the registered version
of the ONNX file on disk by its hash (pipeline/promote.py).

    python -m pipeline.flow                                   # run with params.yaml as it is
    python -m pipeline.flow -S distill.dafl.steps=4000 -S seed=1   # with overrides
    python -m pipeline.flow --variant amalgamation            # the amalgamation pipeline (amalgamation/dvc.yaml)
    python -m pipeline.flow --preset fashion_mnist            # a published setting (presets/), -S on top
"""

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Literal, NamedTuple

from dvc.repo import Repo
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from ruamel.yaml import YAML, YAMLError

from dfkd.checkpoint import atomic_path
from pipeline.promote import Promotion, promote
from pipeline.stale_runs import crash_abandoned_flow_runs
from pipeline.summary import amalgamation_table, load_amalgamation_metrics, load_metrics, summary_table
from stages.params import PARAMS_FILE, ROOT, ParamsError, load_params, validate_params
from stages.amalgamate_evaluate import headline_metrics as amalgamation_headline_metrics
from stages.evaluate import headline_metrics
from stages.tracking import PARENT_RUN_ENV, PROCESS_TAG, STAGE_TAG, TrackingError, configure, process_id, tracking_uri

STAGES = [
    "prepare",
    "train_teacher",
    "synthesize",
    "distill",
    "baseline_noise",
    "baseline_real",
    "export",
    "evaluate",
]
# The amalgamation pipeline: the main pipeline's splits and teacher (its reference), then its own file.
AMALGAMATION_STAGES = ["prepare", "train_teacher"] + [
    f"amalgamation/dvc.yaml:amalgamate_{name}"
    for name in ("teachers", "generator", "conflicts", "group_stack", "end_to_end", "export", "evaluate")
]

REUSED_TAG = "dfkd.reused_stages"  # stages whose outputs DVC kept or restored instead of running them

PRESETS = ROOT / "presets"  # one file of overrides per published setting
BIN_DIR = Path(sys.executable).parent  # dvc and dvc.yaml's `python -m stages...` must be this environment's


class Variant(NamedTuple):
    stages: list[str]
    load_metrics: Callable[[], dict]
    headline_metrics: Callable[[dict], dict[str, float]]  # what the parent run shows of them
    summary_table: Callable[[dict], str]
    artifact_key: str
    gated: bool  # the quality gate guards the alias the service loads: the distillation student's


VARIANTS = {
    "distillation": Variant(STAGES, load_metrics, headline_metrics, summary_table, "pipeline-summary", gated=True),
    "amalgamation": Variant(
        AMALGAMATION_STAGES,
        load_amalgamation_metrics,
        amalgamation_headline_metrics,
        amalgamation_table,
        "amalgamation-summary",
        gated=False,
    ),
}


def overridden(overrides: dict[str, object], path: Path = PARAMS_FILE) -> str:
    """The text of params.yaml with dotted keys (`distill.dafl.steps`) set, comments kept; validated."""
    round_trip = YAML()
    document = round_trip.load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = document
        for key in parents:
            if not isinstance(section.get(key), dict):
                raise ParamsError(f"override '{dotted}': {path.name} has no section '{key}'")
            section = section[key]
        section[leaf] = value
    buffer = StringIO()
    round_trip.dump(document, buffer)
    validate_params(YAML(typ="safe").load(buffer.getvalue()), source=f"{path.name} with overrides {overrides}")
    return buffer.getvalue()


def apply_overrides(overrides: dict[str, object], path: Path = PARAMS_FILE) -> None:
    """Write the overrides into params.yaml, only once the result is valid: a bad one changes nothing."""
    if overrides:
        text = overridden(overrides, path)
        with atomic_path(path) as tmp:
            tmp.write_text(text)


class StageOutcome(NamedTuple):
    seconds: float
    ran: bool  # False: DVC found it up to date or restored its outputs from the run-cache


class RemoteError(RuntimeError):
    """The project's DVC remote cannot be reached; the message names it."""


def dvc_remote() -> str | None:
    """The project's default DVC remote, once it answers; None when it has none. With one, every
    stage first restores what a run elsewhere pushed, and the flow pushes what it ran."""
    with Repo(ROOT) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return None
        url = repo.config["remote"].get(name, {}).get("url")
        try:
            remote = repo.cloud.get_remote(name)
            found = remote.fs.exists(remote.path)
        except Exception as error:  # noqa: BLE001 - each storage (S3, SSH, ...) raises its own errors
            raise RemoteError(f"DVC remote '{name}' ({url}, .dvc/config core.remote): cannot be reached ({error})") from None
    if not found and remote.fs.protocol == "local":  # an object store creates its prefix on the first push
        raise RemoteError(f"DVC remote '{name}' ({url}, .dvc/config core.remote): the directory does not exist")
    return name


def lock_entry(stage: str) -> dict | None:
    """The stage's entry in its dvc.lock: what DVC recorded of its deps and outputs."""
    dvc_file, _, name = stage.rpartition(":")
    lock_file = ROOT / Path(dvc_file or "dvc.yaml").with_suffix(".lock")
    lock = YAML(typ="safe").load(lock_file.read_text()) if lock_file.is_file() else None
    return (lock or {}).get("stages", {}).get(name)


def dvc_command(*arguments: str) -> list[str]:
    return [str(BIN_DIR / "dvc"), *arguments]


@task(retries=2, retry_delay_seconds=5, task_run_name="{stage}")
def run_stage(stage: str, parent_run_id: str, pull: bool = False) -> StageOutcome:
    """Run one DVC stage in its own process (quiet: the stage's own output, none of DVC's advice);
    with `pull`, first restore it from the DVC remote if a run elsewhere pushed it."""
    logger = get_run_logger()
    start = time.perf_counter()
    environment = {**os.environ, PARENT_RUN_ENV: parent_run_id, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}"}
    recorded = lock_entry(stage)
    pulling = ["--pull"] if pull else []
    completed = subprocess.run(dvc_command("repro", "--quiet", "--single-item", *pulling, stage), cwd=ROOT, env=environment)
    elapsed = time.perf_counter() - start
    if completed.returncode:
        raise RuntimeError(f"stage '{stage}' failed (dvc exit code {completed.returncode}); its error is above")
    name = stage.rpartition(":")[2]
    client = MlflowClient()
    ran = bool(client.search_runs(  # did the stage log a run of its own under this flow's parent?
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{STAGE_TAG}` = '{name}'",
        max_results=1,
    ))
    if ran:
        logger.info("%s: ran in %.1f s", name, elapsed)
    else:
        how = "up to date" if lock_entry(stage) == recorded else "restored from DVC's run-cache"
        logger.info("%s: %s", name, how)
    return StageOutcome(elapsed, ran)


@task(retries=2, retry_delay_seconds=5, task_run_name="push")
def push_outputs(stages: list[str], remote: str) -> None:
    """Push the stages' outputs and run-cache entries to the DVC remote, for runs elsewhere to restore."""
    completed = subprocess.run(dvc_command("push", "--quiet", "--run-cache", *stages), cwd=ROOT)
    if completed.returncode:
        raise RuntimeError(f"dvc push to remote '{remote}' failed (exit code {completed.returncode}); its error is above")


@task(task_run_name="promote")
def promote_student(parent_run_id: str) -> Promotion:
    """The quality gate (pipeline/promote.py): move the serving alias, or say why not."""
    promotion = promote(load_params())
    client = MlflowClient()
    client.log_metric(parent_run_id, "promoted", int(promotion.promoted))
    client.set_tag(parent_run_id, "promotion", promotion.report())
    (get_run_logger().info if promotion.promoted else get_run_logger().warning)(promotion.report())
    return promotion


@flow(name="data-free-distillation")
def pipeline(
    overrides: dict[str, object] | None = None,
    variant: Literal["distillation", "amalgamation"] = "distillation",
    sweep_run_id: str | None = None,
) -> dict:
    """Run every stage of the variant (the distillation pipeline, or the amalgamation one) and, for the
    distillation pipeline, the promotion gate; return the metrics of its evaluate stage with each
    stage's wall time (and the gate's outcome). A sweep (pipeline/sweep.py) passes its MLflow run,
    under which this run's is nested."""
    for name in crash_abandoned_flow_runs():
        get_run_logger().warning("flow run %s was left running by a killed process: marked CRASHED", name)
    chosen = VARIANTS[variant]
    apply_overrides(overrides or {})
    params = load_params()  # fails here, before any work, on an invalid params.yaml
    experiment_id = configure(params.mlflow.experiment)  # and on a tracking server that does not answer
    remote = dvc_remote()
    client = MlflowClient()
    parent = client.create_run(
        experiment_id,
        run_name=f"prefect {flow_run.get_name() or 'pipeline'}",
        tags={
            "prefect.flow_run_id": str(flow_run.get_id()),
            "overrides": repr(overrides or {}),
            "variant": variant,
            PROCESS_TAG: process_id(),  # a killed flow's parent then ends KILLED at the next stage start
            **({MLFLOW_PARENT_RUN_ID: sweep_run_id} if sweep_run_id else {}),
        },
    ).info.run_id
    status = "FAILED"
    try:
        outcomes = {stage.rpartition(":")[2]: run_stage(stage, parent, pull=bool(remote)) for stage in chosen.stages}
        if remote:
            push_outputs(chosen.stages, remote)
        promotion = promote_student(parent) if chosen.gated else None
        metrics = chosen.load_metrics()
        metrics["stage_seconds"] = {stage: outcome.seconds for stage, outcome in outcomes.items()}
        if promotion:
            metrics["promotion"] = promotion.report()
        for stage, seconds in metrics["stage_seconds"].items():
            client.log_metric(parent, f"seconds_{stage}", seconds)
        for name, value in chosen.headline_metrics(metrics).items():
            client.log_metric(parent, name, value)
        metrics["reused_stages"] = [stage for stage, outcome in outcomes.items() if not outcome.ran]
        client.set_tag(parent, REUSED_TAG, ", ".join(metrics["reused_stages"]))
        create_markdown_artifact(
            chosen.summary_table(metrics), key=chosen.artifact_key, description=f"Results of the {variant} pipeline"
        )
        status = "FINISHED"
        return metrics
    finally:
        client.set_terminated(parent, status=status)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`key=value` pairs as `dvc exp run -S` takes them; values are parsed as YAML 1.2 (3000, 1e-3, true)."""
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ParamsError(f"-S {pair}: not of the form key=value")
        try:
            overrides[key] = YAML(typ="safe").load(value)
        except YAMLError as error:
            raise ParamsError(f"-S {pair}: the value is not valid YAML ({error.problem})") from None
    return overrides


def preset_overrides(name: str) -> dict[str, object]:
    """The overrides of presets/<name>.yaml: dotted keys and values, as `-S` takes them."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(found.stem for found in PRESETS.glob("*.yaml")))
        raise ParamsError(f"--preset {name}: no such preset (the presets: {known})")
    try:
        overrides = YAML(typ="safe").load(path.read_text())
    except YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(overrides, dict):
        raise ParamsError(f"{path}: expected a mapping of dotted keys to values")
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--variant", choices=VARIANTS, default="distillation", help="which pipeline to run")
    parser.add_argument("--preset", help="a published setting: the overrides of presets/<PRESET>.yaml")
    args = parser.parse_args()
    try:  # a mistake costs one line here, before Prefect starts, not a failed flow run
        overrides = {**(preset_overrides(args.preset) if args.preset else {}), **parse_overrides(args.set_param)}
        overridden(overrides)
        tracking_uri()
        dvc_remote()
    except (ParamsError, TrackingError, RemoteError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    metrics = pipeline(overrides=overrides, variant=args.variant)
    print("\n" + VARIANTS[args.variant].summary_table(metrics))


if __name__ == "__main__":
    main()
