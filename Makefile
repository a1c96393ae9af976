# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CLI     = $(VENV)/bin/vlpet-fx
STAMP   = $(VENV)/.installed
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_VERBOSITY = error

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(CLI) models
	$(CLI) inspect t5 --size small
	$(CLI) inspect t5 --size small --format svg --out demo/t5-small.svg
	$(CLI) patch t5 --size small --rules vlpet_large_t5 --dry-run

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(PY) bench/capture.py
	$(PY) bench/budget.py
	$(PY) bench/step.py --rounds 3

clean:
	rm -rf $(VENV) build *.egg-info demo
