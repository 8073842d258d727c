# Development of the template and its shared runtime (backend_common).
# `make test` works from a clean clone: it creates what it needs first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
FRONTEND_VENV := .venv-dynamo

.PHONY: install frontend test unit lint format examples check-examples new demo bench bench-publish clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(FRONTEND_VENV)/.installed: template/scripts/install-dynamo-frontend.sh template/scripts/dynamo-frontend-constraints.txt
	PYTHON=$(PYTHON) bash template/scripts/install-dynamo-frontend.sh $(FRONTEND_VENV)
	touch $@

install: $(VENV)/.installed $(FRONTEND_VENV)/.installed ## dev venv + the real Dynamo 1.6.1 frontend

frontend: $(FRONTEND_VENV)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: install lint ## everything CI runs
	DYNAMO_FRONTEND_PYTHON=$(CURDIR)/$(FRONTEND_VENV)/bin/python $(PY) -m pytest -q -ra

unit: $(VENV)/.installed ## fast tests only (no frontend, no template renders)
	$(PY) -m pytest -q -m "not e2e and not slow"

examples: $(VENV)/.installed ## re-render examples/ from the template
	$(PY) -m generator examples

check-examples: $(VENV)/.installed
	$(PY) -m generator check-examples

new: $(VENV)/.installed ## make new DEST=../mybackend [DATA="engine_kind=mocker"]
	$(PY) -m generator new $(DEST) $(DATA)

demo: install ## generate a backend and show it answering a chat request through the real frontend
	$(PY) -m generator demo

bench: install ## pure-Python runtime vs Dynamo's own workers (writes bench/results/, scratch)
	$(PY) -m pip install -q -e ".[bench]"
	DYNAMO_FRONTEND_PYTHON=$(CURDIR)/$(FRONTEND_VENV)/bin/python $(PY) -m bench

bench-publish: $(VENV)/.installed ## commit-ready docs/benchmark.md + README table from RUN=<json>
	$(PY) -m bench.publish $(RUN)

clean:
	rm -rf $(VENV) $(FRONTEND_VENV) .pytest_cache .ruff_cache
