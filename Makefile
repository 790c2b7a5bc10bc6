# Developer entry points. Every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the packaging metadata changes.
STAMP := $(VENV)/.install-stamp
# benchmarks/ may not exist yet; ruff fails on a missing path.
LINT_PATHS := $(wildcard mongoengine_lockable tests benchmarks)

.PHONY: venv test demo clean faketime

venv: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test,dev,cli,bench]'
	touch $(STAMP)

test: venv faketime
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy mongoengine_lockable
	$(BIN)/pytest -q

# The clock-skew tests run workers under Debian's faketime (libfaketime).
faketime:
	@command -v faketime >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime; \
	  else \
	    echo "faketime is missing: install Debian's 'faketime' package (the clock-skew tests need it)"; \
	  fi; }

demo: venv
	$(BIN)/python -m mongoengine_lockable demo

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
