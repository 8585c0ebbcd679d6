"""Orchestration: the Prefect flow over the DVC stages, its deployment and the results summary.

Prefect is configured here, before any module of this package imports it: its state (the temporary
server's database, profiles) lives in the repository's ignored `.prefect/` rather than in the user's
home, and the temporary server that `python -m pipeline.flow` starts when no PREFECT_API_URL is set
gets the time a loaded 2-core machine needs to create its database on a first run (Prefect's default
is 20 s). Either can be set in the environment instead.
"""

import os
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry call at start
