"""Data-free knowledge distillation: models, losses, synthesis methods, distillation, export.

This package knows nothing of DVC, Prefect or MLflow; the pipeline stages wrap it.
"""
