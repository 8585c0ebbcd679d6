"""Run the pipeline flow against Prefect's test harness (a real, temporary Prefect server and
database) from the project copy given as the working directory; print what the test checks."""

import json
import sys

from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

with prefect_test_harness():
    from pipeline.flow import pipeline

    state = pipeline(overrides=json.loads(sys.argv[1]), return_state=True)
    summary = Artifact.get("pipeline-summary")
    with get_client(sync_client=True) as client:
        task_runs = [(run.name, run.state_name) for run in client.read_task_runs()]
    print(json.dumps({"state": state.type.value, "summary": summary.data, "task_runs": task_runs}))
