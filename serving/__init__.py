"""HTTP service for the exported ONNX student: FastAPI + onnxruntime, no PyTorch anywhere.

    python -m serving --model models/student.onnx
    python -m serving --model models:/dfkd-student@champion      # from the MLflow registry

Only numpy, onnxruntime, FastAPI/uvicorn, Pillow and prometheus-client are imported to serve a file
(requirements-serving.txt); MLflow is imported only to resolve a `models:/` URI. The preprocessing
constants (pixel mean and std, input size, accepted image sizes, class names) are read from the ONNX
file's metadata, which the export stage writes from `dfkd.data`.
"""
