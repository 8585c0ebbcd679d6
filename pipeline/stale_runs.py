"""Flow runs that a killed flow process left RUNNING in Prefect's database, ended as CRASHED.

Prefect cannot tell a flow run whose process was killed (SIGKILL, a lost machine) from one still at
work, so such a run stays RUNNING forever, with its running task runs. Each flow run of this project
records its process as a label (host, pid and start time, so that a reused pid is not taken for it);
the next flow run to start ends the earlier RUNNING ones whose process is gone as CRASHED. A run
whose process is on another host, or that recorded none, is left alone: nothing here can tell.
"""

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed

from stages.tracking import process_gone, process_id

PROCESS_LABEL = "dfkd.process"


def crash_abandoned_flow_runs() -> list[str]:
    """Record this flow run's process, then end the same flow's other RUNNING runs whose process is
    gone, and their RUNNING task runs, as CRASHED; return the names of those flow runs. Called first
    thing in a flow."""
    current = flow_run.get_id()
    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(current, {PROCESS_LABEL: process_id()})
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_run.get_flow_name()])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
        )
        abandoned = [
            run for run in running
            if str(run.id) != current and PROCESS_LABEL in run.labels and process_gone(str(run.labels[PROCESS_LABEL]))
        ]
        for run in abandoned:
            crashed = Crashed(message=f"its process {run.labels[PROCESS_LABEL]} is gone (found by {flow_run.get_name()})")
            client.set_flow_run_state(run.id, crashed, force=True)
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING]))),
            )
            for task_run in tasks:
                client.set_task_run_state(task_run.id, Crashed(message="its flow run crashed"), force=True)
    return [run.name for run in abandoned]
