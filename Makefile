# django-satori developer tasks. A fresh clone needs only Python >= 3.11 and git:
#   make test   - virtualenv, whole suite on SQLite, then on PostgreSQL if one can start,
#                 ruff (lint and format) and mypy
# Redis and PostgreSQL are throwaway servers started by tests/services.py when
# their binaries are installed (Debian: apt-get install redis-server postgresql).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-setup.cfg
ARGS   ?=
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-x -k worker"`.
PYTEST_ARGS ?=
TOX_ENVS_CI := py311-django42,py313-django60
# tox finds the interpreters of the matrix on PATH; pyenv keeps them here.
space       := $(eval) $(eval)
PYENV_BINS  := $(subst $(space),:,$(wildcard $(HOME)/.pyenv/versions/3.1[1-9]*/bin))

.PHONY: help venv test lint demo bench messages makemessages dist matrix matrix-ci clean distclean

help:
	@echo "make venv       create $(VENV) (Python >= 3.11) with the test and dev extras"
	@echo "make test       whole suite on SQLite, then PostgreSQL; ruff and mypy"
	@echo "make lint       ruff and mypy"
	@echo "make demo       run the example project's demo"
	@echo "make bench      run the benchmarks (ARGS=--full adds 1,000,000-row exports and the import; --proposals the breakdowns)"
	@echo "make messages   compile the translations (needs gettext)"
	@echo "make dist       build wheel and sdist into dist/"
	@echo "make matrix     tox over every Python/Django combination"
	@echo "make matrix-ci  tox over the oldest and newest combination: $(TOX_ENVS_CI) (not slow)"
	@echo "make clean      remove build and test leftovers (distclean: also $(VENV))"

venv: $(STAMP)

# Re-installed only when setup.cfg (the dependencies) changes.
$(STAMP): setup.cfg
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: '$(PYTHON)' must be Python >= 3.11 (found: $$($(PYTHON) --version 2>&1))." >&2; \
	  echo "       Run e.g. 'make PYTHON=python3.12 test'." >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "error: $(VENV) uses $$($(PY) --version); remove it (make distclean) and retry." >&2; exit 1; }
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[test,dev]"
	@touch $@

test: venv
	@if command -v msgfmt >/dev/null 2>&1; then $(MAKE) --no-print-directory messages; \
	 else echo "notice: gettext (msgfmt) not installed; using the committed .mo files"; fi
	$(PY) -m tests.services run --junit-dir test-artifacts -- $(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

demo: venv
	$(PY) -m example_project.demo

BENCH_STAMP := $(VENV)/.installed-bench
# The bench extra (django-import-export, pyinstrument); reinstalled when setup.cfg changes.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	@touch $@

bench: $(BENCH_STAMP)
	$(PY) -m bench.run $(ARGS)

messages: venv
	@if ls django_satori/locale/*/LC_MESSAGES/*.po >/dev/null 2>&1; then \
	  echo "compilemessages (django_satori/locale)"; \
	  cd django_satori && $(abspath $(PY)) -m django compilemessages; \
	else echo "notice: no .po files under django_satori/locale yet"; fi

makemessages: venv
	mkdir -p django_satori/locale
	cd django_satori && $(abspath $(PY)) -m django makemessages -l ja --no-obsolete

dist: venv messages
	@$(PY) -m pip show build >/dev/null 2>&1 || $(PY) -m pip install --quiet build
	rm -rf dist
	$(PY) -m build --outdir dist .

matrix: venv
	PATH="$(PYENV_BINS):$$PATH" $(PY) -m tox run-parallel -p auto

# Without the long fault scenarios (marker "slow"): `make test` runs them on both
# databases; here the point is the oldest and newest Python/Django pair. The two run
# side by side (much of a run waits on workers and sockets); tox prints a failed
# environment's output at the end, and each writes its own JUnit report.
matrix-ci: venv
	PATH="$(PYENV_BINS):$$PATH" $(PY) -m tox run-parallel -p 2 -e $(TOX_ENVS_CI) -- -m "not slow"

clean:
	rm -rf build dist *.egg-info .tox .mypy_cache .ruff_cache .pytest_cache test-artifacts
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
