"""Prefect's overhead per stage: each stage's wall time as a task of a flow run on a process worker
(pipeline/deploy.py), against the same stage run directly (`dvc repro --single-item`), side by side.

In a fresh copy of the project, on short settings (the overhead does not depend on a stage's
length): every stage run directly, then the whole pipeline as one flow run of the deployment on a
real Prefect server and process worker started here, in the worker's own clone, with the same
params; `--rounds` times, alternating. Also the flow run's cost outside its stages: the worker
picking it up, cloning the repository, the flow's start and the promotion gate. Prints the table
and writes it to BENCHMARKS.md with the machine and the date.

    python benchmarks/prefect_overhead.py --rounds 2
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime
from pathlib import Path

import httpx

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.pipeline import BIN, GIT_IDENTITY, fresh_copy, run_stage  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402
from pipeline.flow import STAGES, apply_overrides  # noqa: E402

SHORT = {"train_teacher.epochs": 1, "synthesize.dafl.steps": 40, "distill.dafl.steps": 200, "distill.dafl.pool_size": 4096,
         "evaluate.latency_repeats": 5}
POOL = "dfkd-benchmark"


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def wait_until_it_answers(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(1)


def flow_run_on_the_worker(api: str) -> dict:
    """One flow run of the deployment, to its end: each stage task's wall seconds, and the rest."""
    deployment = httpx.get(f"{api}/deployments/name/data-free-distillation/dfkd-pool").raise_for_status().json()
    created = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": {}})
    run_id = created.raise_for_status().json()["id"]
    while (found := httpx.get(f"{api}/flow_runs/{run_id}").json())["state_type"] not in ("COMPLETED", "FAILED", "CRASHED"):
        time.sleep(2)
    if found["state_type"] != "COMPLETED":
        raise SystemExit(f"the flow run ended {found['state_type']}: see the worker's log")
    tasks = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
    stages = {task["name"]: seconds_between(task["start_time"], task["end_time"]) for task in tasks}
    return {
        "stages": {stage: stages[stage] for stage in STAGES},
        "pickup": seconds_between(found["expected_start_time"], found["start_time"]),
        "flow": seconds_between(found["start_time"], found["end_time"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way, alternating")
    rounds = parser.parse_args().rounds
    direct, worker = {stage: [] for stage in STAGES}, []
    with tempfile.TemporaryDirectory(prefix="dfkd-bench-") as scratch:
        root = fresh_copy(Path(scratch) / "checkout", seed=0)
        apply_overrides(SHORT, root / "params.yaml")
        subprocess.run(["git", "commit", "-qam", "short settings"], cwd=root, check=True, env={**os.environ, **GIT_IDENTITY})
        api = "http://127.0.0.1:4299/api"
        environment = {
            **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1",
            "PREFECT_HOME": f"{scratch}/prefect", "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        environment.pop("MLFLOW_TRACKING_URI", None)  # both ways on the checkout's SQLite store
        log = open(Path(scratch) / "servers.log", "w")
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--port", "4299"], env=environment,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_it_answers(f"{api}/health")
            for command in (["prefect", "work-pool", "create", POOL, "--type", "process"],
                            ["python", "-m", "pipeline.deploy", "--pool", POOL]):
                subprocess.run([str(BIN / command[0]), *command[1:]], cwd=root, env=environment, check=True, stdout=log)
            worker_process = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL], env=environment,
                                              stdout=log, stderr=subprocess.STDOUT)
            try:
                for round_number in range(rounds):
                    for stage in STAGES:
                        direct[stage].append(run_stage(root, stage, f"direct, round {round_number + 1}", force=True)["seconds"])
                    worker.append(flow_run_on_the_worker(api))
                    print(f"  worker, round {round_number + 1}: flow run {worker[-1]['flow']:.1f} s", flush=True)
            finally:
                worker_process.terminate()
                worker_process.wait(timeout=60)
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()

    def mean(values: list[float]) -> str:
        return f"{statistics.mean(values):.1f}"

    lines = [
        f"Prefect overhead per stage, {date.today().isoformat()}, {machine()}; short settings {SHORT}, "
        f"{rounds} rounds, mean seconds. Direct: `dvc repro --single-item --force STAGE`; under the worker: the "
        "stage's task in a flow run of the pool deployment, in the worker's own clone, the same params.",
        "",
        "| stage | direct (s) | task under the worker (s) | overhead (s) |",
        "|---|---:|---:|---:|",
    ]
    for stage in STAGES:
        under = [run["stages"][stage] for run in worker]
        overhead = [b - a for a, b in zip(direct[stage], under)]
        lines.append(f"| {stage} | {mean(direct[stage])} | {mean(under)} | {mean(overhead)} |")
    outside = [run["flow"] - sum(run["stages"].values()) for run in worker]
    lines += [
        "",
        f"- a flow run was running {mean([run['pickup'] for run in worker])} s after it was created: the worker's poll "
        "(every 2 s here, `PREFECT_WORKER_QUERY_SECONDS`; Prefect's default is 10 s), the clone of the repository, "
        "the start of the flow run's process and its imports",
        f"- once running, it spent {mean(outside)} s outside its stages: the flow's start, its MLflow parent run, "
        "the promotion gate, the summary",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    write_section("prefect_overhead", "## Prefect overhead per stage\n\n" + table)


if __name__ == "__main__":
    main()
