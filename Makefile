# Set-up lives here: `make demo` and `make test` create or update the project's own
# virtual environment (.venv) and then run. Override e.g. `make demo DATASET=cifar10` (default: the preset's).
PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install: torch==2.13.0 is CUDA-enabled from PyPI on Linux x86-64 (a
# CPU-only wheel where one is provided locally). Set TORCH="torch" to take the newest release.
TORCH ?= torch==2.13.0
DATASET ?=
# The main job: the whole series at the quick preset (about 10 minutes on a 2-core CPU; PRESET=medium:
# about 30 minutes there; PRESET=gpu: full CIFAR-10 on one GPU). Extra options go here, e.g. DEMO_ARGS="--set search.trials=100" or
# DEMO_ARGS="--quiet".
PRESET ?= quick
DEMO_OUT ?=
DEMO_ARGS ?=

STAMP := $(VENV)/.effcifar-installed

.PHONY: demo test test-slow test-all test-lowest venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/effcifar pipeline --preset $(PRESET) $(if $(DATASET),--dataset $(DATASET)) $(DEMO_ARGS) $(if $(DEMO_OUT),--out $(DEMO_OUT))

# The tests in two tiers: `make test` is the fast tier (under 5 minutes on a 2-core CPU); `make test-slow` the
# second (end-to-end, subprocess, kill -9 and resume, real-data, PostgreSQL and browser tests: the `slow` marker);
# `make test-all` both in one run. CI runs the two tiers and test-lowest.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The study tests once more against the lowest Optuna and SQLAlchemy that pyproject.toml allows: a second
# environment that takes everything else from $(VENV) and installs only those two, at their lower bounds.
LOWEST := $(shell sed -n 's/^ *"\(optuna\|sqlalchemy\)>=\([0-9.]*\).*/\1==\2/p' pyproject.toml)
STUDY_TESTS ?= tests/test_hpo_study.py tests/test_hpo_postgres.py tests/test_nas_search.py tests/test_nas_samplers.py \
	tests/test_nas_select.py
test-lowest: $(STAMP)
	test -x $(VENV)-lowest/bin/python || $(PYTHON) -m venv $(VENV)-lowest
	$(VENV)/bin/python -c "import site; print('import site; site.addsitedir(%r)' % site.getsitepackages()[0])" \
		> "$$($(VENV)-lowest/bin/python -c 'import site; print(site.getsitepackages()[0])')/effcifar-main-venv.pth"
	$(VENV)-lowest/bin/python -m pip install --quiet --no-deps $(LOWEST)
	$(VENV)-lowest/bin/python -c "import optuna, sqlalchemy; print('lowest: optuna', optuna.__version__, 'sqlalchemy', sqlalchemy.__version__)"
	$(VENV)-lowest/bin/python -m pytest -q $(STUDY_TESTS)

bench: $(STAMP)
	$(VENV)/bin/python bench/train_step.py

clean:
	rm -rf $(VENV) $(VENV)-lowest build *.egg-info
