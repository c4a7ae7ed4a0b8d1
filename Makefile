# Two commands on a fresh machine:  make simulate  (the main job)  and  make test.
# Each creates .venv and installs hemex with its pinned, tested dependency versions on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
SEED ?= 0
ARGS ?=

.PHONY: simulate test install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

simulate: $(STAMP)
	$(VENV)/bin/hemex simulate --seed $(SEED) --out runs/paper-seed$(SEED) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
