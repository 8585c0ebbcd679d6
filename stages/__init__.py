"""Pipeline stages: one module per DVC stage, each `python -m stages.<name>`.

A stage reads its section of params.yaml, calls the `dfkd` package, writes its outputs atomically
and logs to MLflow. The methods themselves live in `dfkd`.
"""
