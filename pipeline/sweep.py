"""A sweep: one flow run that fans a grid of overrides (seeds x methods x students ...) out as
concurrent flow runs of the pool deployment (pipeline/deploy.py), waits for all of them, and ends
with one comparison: a table (printed, and a Prefect artifact) and a plot, both on an MLflow run
under which the grid's runs are nested, side by side. Every point is validated before any starts.

    python -m pipeline.sweep -G seed=0,1,2 -G synthesize.method=dafl,zskd
    python -m pipeline.sweep -G distill.student.architecture=lenet5_half,lenet5 -S distill.dafl.steps=2000
"""

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from ruamel.yaml import YAML, YAMLError

from dfkd.plots import save_comparison
from pipeline.deploy import DEPLOYMENT_NAME, DeployError, found_on_server
from pipeline.flow import overridden, parse_overrides
from stages.params import ParamsError, load_params
from stages.tracking import TrackingError, configure, tracking_uri

DEPLOYMENT = f"data-free-distillation/{DEPLOYMENT_NAME}"
SWEEP_TAG = "dfkd.sweep"  # on the sweep's MLflow run: the grid
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def grid_points(grid: dict[str, list], fixed: dict[str, object]) -> list[dict[str, object]]:
    """Every combination of the grid's values, with the fixed overrides, each validated."""
    points = [{**fixed, **dict(zip(grid, values))} for values in itertools.product(*grid.values())]
    for point in points:
        overridden(point)
    return points


def comparison_table(rows: list[dict]) -> str:
    lines = [
        "### Sweep", "",
        "| overrides | state | student | teacher | gap to teacher | noise floor | real-data ceiling | minutes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        metrics = row["metrics"]
        if "student_accuracy" in metrics:
            figures = (
                f"{metrics['student_accuracy']:.2%} | {metrics['teacher_accuracy']:.2%} | "
                f"{(metrics['teacher_accuracy'] - metrics['student_accuracy']) * 100:.2f} pt | "
                f"{metrics['baseline_noise_accuracy']:.2%} | {metrics['baseline_real_accuracy']:.2%}"
            )
        else:
            figures = " | | | | "
        lines.append(f"| {row['label']} | {row['state']} | {figures} | {row['minutes']:.1f} |")
    return "\n".join(lines)


@flow(name="dfkd-sweep")
def sweep(grid: dict[str, list], fixed: dict[str, object] | None = None, deployment: str = DEPLOYMENT) -> list[dict]:
    """Run the pipeline deployment once per point of `grid` (dotted params.yaml keys to lists of
    values), with the `fixed` overrides too, all at once; return each point's state and metrics."""
    points = grid_points(grid, fixed or {})
    logger = get_run_logger()
    experiment_id = configure(load_params().mlflow.experiment)
    client = MlflowClient()
    sweep_run = client.create_run(
        experiment_id, run_name=f"sweep {flow_run.get_name()}",
        tags={"prefect.flow_run_id": str(flow_run.get_id()), SWEEP_TAG: repr({"grid": grid, "fixed": fixed or {}})},
    ).info.run_id
    status = "FAILED"
    try:
        children = [
            run_deployment(deployment, parameters={"overrides": point, "sweep_run_id": sweep_run}, timeout=0)
            for point in points
        ]
        logger.info("started %d flow runs of %s", len(children), deployment)
        with get_client(sync_client=True) as prefect:
            while not all(prefect.read_flow_run(child.id).state_type.value in FINAL for child in children):
                time.sleep(5)
            finished = [prefect.read_flow_run(child.id) for child in children]
        rows = []
        for point, child in zip(points, finished):
            parents = client.search_runs([experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{child.id}'")
            label = ", ".join(f"{key}={value}" for key, value in point.items() if key in grid)
            minutes = (child.total_run_time.total_seconds() if child.total_run_time else 0) / 60
            rows.append({"label": label, "overrides": point, "state": child.state_type.value, "minutes": minutes,
                         "metrics": parents[0].data.metrics if parents else {}})
        table = comparison_table(rows)
        create_markdown_artifact(table, key="sweep-comparison", description=f"The {len(rows)} runs of the sweep")
        scored = [row for row in rows if "student_accuracy" in row["metrics"]]
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "comparison.md").write_text(table)
            if scored:
                save_comparison(
                    [row["label"] for row in scored],
                    {name: [row["metrics"][f"{name}_accuracy"] for row in scored] for name in ("student", "teacher")},
                    Path(scratch) / "comparison.png", "test accuracy per grid point",
                )
            with mlflow.start_run(run_id=sweep_run):
                mlflow.log_artifacts(scratch)
        if len(scored) < len(rows):
            raise RuntimeError(f"{len(rows) - len(scored)} of the sweep's {len(rows)} flow runs did not finish; see the table")
        status = "FINISHED"
        return rows
    finally:
        client.set_terminated(sweep_run, status=status)


def check_deployment(name: str) -> None:
    if not found_on_server(lambda client: client.read_deployment_by_name(name), "a sweep runs a deployment on"):
        raise DeployError(f"--deployment {name}: no such deployment on {PREFECT_API_URL.value()} (python -m pipeline.deploy)")


def parse_grid(pairs: list[str]) -> dict[str, list]:
    """`key=v1,v2,...` pairs; each value parsed as YAML, as `-S` does."""
    grid = {}
    for pair in pairs:
        key, separator, values = pair.partition("=")
        if not separator or not key or not values:
            raise ParamsError(f"-G {pair}: not of the form key=value1,value2,...")
        try:
            grid[key] = YAML(typ="safe").load(f"[{values}]")
        except YAMLError as error:
            raise ParamsError(f"-G {pair}: the values are not valid YAML ({error.problem})") from None
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-G", "--grid", action="append", required=True, metavar="KEY=V1,V2", help="a param's values")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE", help="a param of every run")
    parser.add_argument("--deployment", default=DEPLOYMENT, help=f"the deployment to run (default: {DEPLOYMENT})")
    args = parser.parse_args()
    try:
        grid, fixed = parse_grid(args.grid), parse_overrides(args.set_param)
        grid_points(grid, fixed)
        tracking_uri()
        check_deployment(args.deployment)
    except (ParamsError, TrackingError, DeployError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(comparison_table(sweep(grid=grid, fixed=fixed, deployment=args.deployment)))


if __name__ == "__main__":
    main()
