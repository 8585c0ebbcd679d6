"""Deploy the pipeline on a Prefect work pool, whose workers run its flow runs: a process pool on
one machine, a Docker or Kubernetes pool on a cluster (README, "Deployments on a pool of workers").

Each flow run starts in a new, empty directory of its worker and clones the git repository there
(the committed code and params.yaml of `--branch`), so concurrent runs with different overrides
never share params.yaml or outputs. What runs share goes through stores every worker reaches: the
MLflow tracking server of MLFLOW_TRACKING_URI (by default this checkout's SQLite store, which only
workers on this machine reach) and the DVC remote of the committed .dvc/config, from which each run
restores the stages another run already ran, and to which it pushes its own.

    prefect work-pool create dfkd-process --type process --concurrency-limit 1
    python -m pipeline.deploy --pool dfkd-process
    prefect worker start --pool dfkd-process
    prefect deployment run 'data-free-distillation/dfkd-pool' --params '{"overrides": {"seed": 1}}'
"""

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

from prefect import flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from prefect.runner.storage import GitRepository
from prefect.settings import PREFECT_API_URL

from stages.params import ROOT, load_params
from stages.tracking import TrackingError, configure

DEPLOYMENT_NAME = "dfkd-pool"


class DeployError(RuntimeError):
    """A setting of the deployment that cannot work; the message names it."""


def current_branch() -> str:
    branch = subprocess.run(
        ["git", "branch", "--show-current"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    if not branch:
        raise DeployError(f"{ROOT} is not on a branch (a detached HEAD): name the one to deploy with --branch")
    return branch


def found_on_server(read: Callable[[SyncPrefectClient], object], needing: str) -> bool:
    """Whether `read` finds its object on the Prefect server; `needing` says what needs the server."""
    if not PREFECT_API_URL.value():
        raise DeployError(f"PREFECT_API_URL is not set: {needing} a Prefect server (`prefect server start`)")
    with get_client(sync_client=True) as client:
        try:
            read(client)
        except ObjectNotFound:
            return False
    return True


def check_work_pool(name: str) -> None:
    """The pool must exist: a deployment on a pool that no worker serves would wait forever."""
    if not found_on_server(lambda client: client.read_work_pool(name), "a work pool lives on"):
        raise DeployError(
            f"--pool {name}: no such work pool on {PREFECT_API_URL.value()}; "
            f"create it with `prefect work-pool create {name} --type process`"
        )


def shared_tracking_uri() -> str:
    """The tracking store the runs share, checked: MLFLOW_TRACKING_URI, or this checkout's SQLite store,
    whose experiment is created here so that the runs' artifacts go to this checkout too, not to the
    temporary directory of a flow run."""
    configure(load_params().mlflow.experiment)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="the work pool whose workers run the flow runs")
    parser.add_argument("--repository", default=str(ROOT), help="the git repository each run clones (default: this one)")
    parser.add_argument("--branch", help="the branch each run clones (default: the current one)")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help=f"the deployment's name (default: {DEPLOYMENT_NAME})")
    parser.add_argument("--image", help="the container image of a Docker or Kubernetes pool's runs (e.g. dfkd-pipeline)")
    parser.add_argument("--concurrency-limit", type=int, default=1, metavar="N",
                        help="flow runs of this deployment at once; more wait their turn (default: 1, one GPU's worth)")
    args = parser.parse_args()
    try:
        check_work_pool(args.pool)
        environment = {"MLFLOW_TRACKING_URI": shared_tracking_uri()}
        branch = args.branch or current_branch()
    except (DeployError, TrackingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    flow.from_source(
        source=GitRepository(url=args.repository, branch=branch), entrypoint="pipeline/flow.py:pipeline"
    ).deploy(
        name=args.name,
        work_pool_name=args.pool,
        job_variables={"env": environment, **({"image": args.image} if args.image else {})},
        parameters={"overrides": {}, "variant": "distillation"},
        concurrency_limit=args.concurrency_limit,
        description="The pipeline in a fresh clone of the repository per flow run; `overrides` takes "
        "params.yaml keys in dotted form, e.g. {'distill.dafl.steps': 4000}; `variant: amalgamation` "
        "runs the amalgamation pipeline instead.",
        print_next_steps=False,
    )
    print(f"deployed 'data-free-distillation/{args.name}' on work pool '{args.pool}' ({args.repository}, {branch})")


if __name__ == "__main__":
    main()
