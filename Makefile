# Development of the template and its shared runtime (backend_common).
# `make test` works from a clean clone: it creates what it needs first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
FRONTEND_VENV := .venv-dynamo

.PHONY: install frontend test unit lint format examples check-examples new demo bench bench-vllm bench-publish soak chaos reliability-doc clean

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
	$(VENV)/bin/mypy

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

bench-vllm: install ## the vLLM pair: engine_kind=vllm vs Dynamo's dynamo.vllm (~10 min; installs it first)
	DYNAMO_FRONTEND_PYTHON=$(CURDIR)/$(FRONTEND_VENV)/bin/python $(PY) -m bench --pairs e/f

bench-publish: $(VENV)/.installed ## commit-ready docs/benchmark.md + README table from RUN=<json>
	$(PY) -m bench.publish $(RUN)

soak: install ## 10 minutes, 16 streaming clients through the real frontend (make test: 60 s)
	RELIABILITY_SOAK_S=600 DYNAMO_FRONTEND_PYTHON=$(CURDIR)/$(FRONTEND_VENV)/bin/python \
		$(PY) -m pytest -q -s tests/reliability/test_reliability_soak.py

chaos: install ## faults in sequence and overlapping under load (make test: one short sequence)
	RELIABILITY_CHAOS=full DYNAMO_FRONTEND_PYTHON=$(CURDIR)/$(FRONTEND_VENV)/bin/python \
		$(PY) -m pytest -q -s tests/reliability/test_reliability_chaos.py

reliability-doc: $(VENV)/.installed ## build/reliability/*.json -> docs/reliability-results.json + doc table
	$(PY) tests/reliability_results.py update

clean:
	rm -rf $(VENV) $(FRONTEND_VENV) .pytest_cache .ruff_cache
