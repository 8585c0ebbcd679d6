# syntax=docker/dockerfile:1
# Two images from one file (README, "Docker"):
#   docker build --target serving -t dfkd-serving .     # slim: onnxruntime, the service, the exported student
#   docker run --rm -p 8000:8000 dfkd-serving
#   docker build --target pipeline -t dfkd-pipeline .   # CPU PyTorch, every pinned requirement; the default target
#   docker run --rm -v "$PWD/mlruns-docker:/app/mlartifacts" dfkd-pipeline
# The serving image copies models/student.onnx: run the pipeline (`make run`) before building it.

# What both images need: Python and the service's pinned requirements.
FROM python:3.11-slim AS runtime
WORKDIR /app
COPY requirements-serving.txt ./
RUN pip install --no-cache-dir --requirement requirements-serving.txt

# The service: no PyTorch, no MLflow, a non-root user, a health check on /ready.
FROM runtime AS serving
COPY serving/ serving/
# Readable by the service's user whatever the umask the pipeline wrote it with.
COPY --chmod=444 models/student.onnx model/student.onnx
RUN useradd --system --no-create-home --uid 10001 serving
USER serving
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]
CMD ["python", "-m", "serving", "--model", "model/student.onnx", "--host", "0.0.0.0", "--port", "8000"]

# The pipeline: CPU only, the pinned requirements, runs the whole pipeline by default.
FROM runtime AS pipeline
# git: DVC keeps its pipeline state in a git repository; make: the README's commands.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt ./
# The CPU build of torch first (PyPI's default wheel brings gigabytes of CUDA libraries); the pin
# in requirements.txt is then already satisfied.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==$(grep '^torch==' requirements.txt | cut -d= -f3)" \
    && pip install --no-cache-dir --requirement requirements.txt

COPY dvc.yaml params.yaml Makefile ./
COPY .dvc/config .dvc/.gitignore .dvc/
COPY .dvcignore ./
COPY dfkd/ dfkd/
COPY stages/ stages/
COPY pipeline/ pipeline/
COPY serving/ serving/
COPY amalgamation/ amalgamation/
COPY data/user/ data/user/
COPY teachers/ teachers/
COPY presets/ presets/
RUN git init --quiet \
    && git add --all \
    && git -c user.name=image -c user.email=image@localhost commit --quiet --message "pipeline image"

ENV TQDM_MININTERVAL=5 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
CMD ["python", "-m", "pipeline.flow"]
