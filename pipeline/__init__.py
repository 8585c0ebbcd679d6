"""Orchestration: the Prefect flow over the DVC stages, its deployment and the results summary."""
