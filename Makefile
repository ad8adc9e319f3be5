# The two commands of the README:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test install install-test browser serve bench exercises clean

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

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) -m minignext bench all

# Copy the exercise stubs into mine/ (git-ignored) to work on them.
exercises:
	mkdir -p mine && cp -n exercises/*.py mine/ && echo "stubs copied to mine/"

clean:
	rm -rf $(VENV) out
