# The two commands of the README: `make run` (set up, then the whole pipeline) and `make test`.
VENV := .venv
BIN := $(VENV)/bin
# Stages run as `python -m stages.<name>` from dvc.yaml: the venv's python must come first.
export PATH := $(abspath $(BIN)):$(PATH)

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
