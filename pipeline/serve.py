"""Serve the pipeline as a Prefect deployment that users trigger, with parameters, from the Prefect
server (UI or CLI). Needs a running server: `prefect server start` in another terminal, then
`export PREFECT_API_URL=http://127.0.0.1:4200/api` here and where you trigger runs.

    python -m pipeline.serve
    prefect deployment run 'data-free-distillation/dfkd-pipeline' \
        --params '{"overrides": {"distill.dafl.steps": 4000, "seed": 1}}'
    prefect deployment run 'data-free-distillation/dfkd-pipeline' --params '{"variant": "amalgamation"}'
"""

from pipeline.flow import pipeline

DEPLOYMENT_NAME = "dfkd-pipeline"


def main() -> None:
    pipeline.serve(
        name=DEPLOYMENT_NAME,
        parameters={"overrides": {}, "variant": "distillation"},
        description="Teacher, data-free synthesis, distillation, ONNX export and evaluation; "
        "`overrides` takes params.yaml keys in dotted form, e.g. {'distill.dafl.steps': 4000}; "
        "`variant: amalgamation` runs the amalgamation pipeline (amalgamation/dvc.yaml) instead.",
    )


if __name__ == "__main__":
    main()
