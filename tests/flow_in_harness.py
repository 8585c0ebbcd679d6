"""Run the pipeline flow against Prefect's test harness (a real, temporary Prefect server and
database) from the project copy given as the working directory; print what the test checks.

    python tests/flow_in_harness.py OVERRIDES_JSON [VARIANT]
"""

import json
import sys

from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

# A generous start-up timeout: on a busy 2-core machine the server takes more than the default 30 s.
with prefect_test_harness(server_startup_timeout=180):
    from pipeline.flow import VARIANTS, pipeline

    variant = sys.argv[2] if len(sys.argv) > 2 else "distillation"
    state = pipeline(overrides=json.loads(sys.argv[1]), variant=variant, return_state=True)
    summary = Artifact.get(VARIANTS[variant].artifact_key)
    with get_client(sync_client=True) as client:
        task_runs = [(run.name, run.state_name) for run in client.read_task_runs()]
    print(json.dumps({"state": state.type.value, "summary": summary.data, "task_runs": task_runs}))
