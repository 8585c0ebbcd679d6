"""A flow run whose process was killed is ended as CRASHED by the next one (Prefect's real test harness)."""

import subprocess
import sys

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from conftest import PROJECT, environment, wait_for
from pipeline.stale_runs import crash_abandoned_flow_runs

FLOW = "stale-runs-test"
# A flow that records its process, then runs a task that says so and works until it is killed.
KILLED_FLOW = f"""
import time
from prefect import flow, task
from pipeline.stale_runs import crash_abandoned_flow_runs

@task
def work():
    print("running", flush=True)
    time.sleep(600)

@flow(name="{FLOW}")
def stuck():
    crash_abandoned_flow_runs()
    work()

stuck()
"""


def test_flow_run_of_a_killed_process_is_crashed_by_the_next_one():
    with prefect_test_harness(server_startup_timeout=180):
        killed = subprocess.Popen(
            [sys.executable, "-c", KILLED_FLOW], cwd=PROJECT, env=environment(PREFECT_API_URL=PREFECT_API_URL.value()),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert killed.stdout.readline() == "running\n"
        with get_client(sync_client=True) as client:  # task runs reach the server as events, a little later
            wait_for(lambda: [run.state_name for run in client.read_task_runs()] == ["Running"])
        killed.kill()
        killed.wait()

        @flow(name=FLOW)
        def next_run() -> list[str]:
            return crash_abandoned_flow_runs()

        crashed = next_run()
        with get_client(sync_client=True) as client:
            states = {run.name: run.state_name for run in client.read_flow_runs()}
            task_states = [run.state_name for run in client.read_task_runs()]
        assert len(crashed) == 1 and states[crashed[0]] == "Crashed"
        assert sorted(states.values()) == ["Completed", "Crashed"] and task_states == ["Crashed"]
