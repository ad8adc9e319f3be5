# The two commands of the README:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test install install-test bench exercises clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml requirements.txt
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-oracle.txt
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps -r requirements-oracle.txt
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/minignext demo

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) -m minignext bench all

# Copy the exercise stubs into mine/ (git-ignored) to work on them.
exercises:
	mkdir -p mine && cp -n exercises/*.py mine/ && echo "stubs copied to mine/"

clean:
	rm -rf $(VENV) out
