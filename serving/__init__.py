"""HTTP service for the exported ONNX student: FastAPI + onnxruntime, no PyTorch anywhere.

    python -m serving --model models/student.onnx
    python -m serving --model models:/dfkd-student@champion      # from the MLflow registry

Only numpy, onnxruntime, FastAPI/uvicorn, Pillow and prometheus-client are imported to serve a file
(requirements-serving.txt); MLflow is imported only to resolve a `models:/` URI. What the model takes
is read from the ONNX file's metadata `input_spec` (the pipeline's `dfkd.inputs.InputSpec`, which the
export stage writes): channels (1 grayscale, 3 RGB), side `size`, per-channel `mean` and `std`,
`class_names`, and `resize` ("pad" or "bilinear").

POST /predict takes either
- JSON `{"images": [...], "pixel_scale": "0-255" | "0-1"}`: each image an array in the model's shape,
  (H, W) or (H, W, 1) for a grayscale model, (H, W, 3) for an RGB one (rows of pixels, as an image
  decoder gives them), with H = W = size, or with resize "pad" any smaller square, which is
  zero-padded, centred, as the pipeline's training does. Arrays are never resized: a client sending
  arrays sends the model's shape.
- multipart uploads `image` of PNG or JPEG files of any size and mode (at most `--max-upload-pixels`
  in all, counted from their headers before any is decoded): converted to the model's channels
  (Pillow's convert("L") or convert("RGB")), then resized to size x size with Pillow's bilinear
  filter, unless resize is "pad" and the image is a square no larger than that (zero-padded as above).
Either way each channel is normalised, (x - mean[c]) / std[c], into the model's float32 (N, C, S, S).
"""
