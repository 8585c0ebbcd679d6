# The two commands of the README: `make run` (set up, then the whole pipeline) and `make test`.
VENV := .venv
BIN := $(VENV)/bin
# Stages run as `python -m stages.<name>` from dvc.yaml: the venv's python must come first.
export PATH := $(abspath $(BIN)):$(PATH)
# Prefect's temporary server would otherwise send a telemetry heartbeat at start (and print a
# "database is locked" traceback when its SQLite file is busy).
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-serving.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --requirement requirements.txt
	touch $@

run: setup
	$(BIN)/python -m pipeline.flow

test: setup
	$(BIN)/python -m pytest
