# The pipeline image: CPU only, the pinned requirements, runs the whole pipeline by default.
#   docker build -t dfkd-pipeline .
#   docker run --rm -v "$PWD/mlruns-docker:/app/mlartifacts" dfkd-pipeline
FROM python:3.11-slim

# git: DVC keeps its pipeline state in a git repository; make: the README's commands.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
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
COPY amalgamation/ amalgamation/
RUN git init --quiet \
    && git add --all \
    && git -c user.name=image -c user.email=image@localhost commit --quiet --message "pipeline image"

ENV TQDM_MININTERVAL=5 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
CMD ["python", "-m", "pipeline.flow"]
