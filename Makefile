# The two commands of README.md. Each installs what it needs first (idempotent).
PYTHON ?= python3
export OMP_NUM_THREADS ?= 1

.PHONY: run test install install-test

OUT ?= runs/quickstart

run: install
	$(PYTHON) -m bgplugin.cli run quickstart --out $(OUT)

test: install-test
	$(PYTHON) -m pytest

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

install-test:
	PYTHON=$(PYTHON) bash scripts/install.sh test
