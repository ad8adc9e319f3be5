# The README's commands:  `make demo`, `make test`, `make serve`, and `make lab` for the notebooks.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
LAB_ARGS ?=

.PHONY: demo test install install-test browser serve lab bench exercises demo-mine clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The editable install points at one checkout, whose path .installed records. A venv that came
# along with a copied checkout (or serves another one) is re-pointed here, so this checkout's
# code is the code that runs.
ifneq ($(shell cat $(VENV)/.installed 2>/dev/null),$(CURDIR))
.PHONY: $(VENV)/.installed
endif

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml requirements.txt requirements-notebooks.txt requirements-base.txt requirements-base-file.txt
	$(PIP) install -q -r requirements.txt -r requirements-notebooks.txt -r requirements-base.txt
	$(PIP) install -q --no-deps -r requirements-base-file.txt
	$(PIP) install -q --no-deps -e .
	echo "$(CURDIR)" > $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-oracle.txt
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps -r requirements-oracle.txt
	touch $@

$(VENV)/.installed-lab: $(VENV)/.installed requirements-lab.txt
	$(PIP) install -q -r requirements-lab.txt
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test browser

# The page test (tests/test_serve.py) drives Debian's chromium through its chromedriver. As root,
# install them when missing; elsewhere say so (that test then skips, and fails under CI=true).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (apt-get) for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver fonts-liberation >/dev/null; \
	else \
		echo "note: chromium and chromedriver are missing; as root: apt-get install chromium chromium-driver"; \
	fi

demo: install
	$(VENV)/bin/minignext demo

# The live chat page on http://127.0.0.1:8000/ (Ctrl-C stops it).
serve: install
	$(VENV)/bin/minignext serve

# Two workers (each test runs on one thread), a test file's tests on one worker: its module
# fixtures are built once.
test: install-test
	$(PY) -m pytest -q -n 2 --dist loadfile

# JupyterLab on notebooks/ (LAB_ARGS adds options, e.g. LAB_ARGS="--no-browser --port=8899").
# Jupyter refuses to run as root unless told to; containers often are root.
lab: $(VENV)/.installed-lab
	$(PY) -m jupyter lab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

bench: install-test
	$(PY) -m minignext bench all

# Copy the exercise stubs into mine/ (git-ignored) to work on them; existing files are kept.
exercises:
	@mkdir -p mine
	@for f in exercises/lesson*.py; do [ -e mine/$${f##*/} ] || cp $$f mine/; done
	@echo "stubs in mine/ (files you already had are kept)"

# The demo with your solutions in mine/ swapped into the library (see minignext/exercises.py).
demo-mine: install
	$(PY) -m minignext.exercises mine demo --out out/demo-mine --overwrite

clean:
	rm -rf $(VENV) out
