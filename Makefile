# `make test` builds .venv (again whenever a requirements file changes) and runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-all lint format bench-gae bench-sampling demo clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The suite without the tests marked slow (`make test-all` runs those too).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# Every test, including the ones marked slow.
test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --runslow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check vcppo_jax configs tests benchmarks experiments
	$(VENV)/bin/ruff format --check vcppo_jax configs tests benchmarks experiments

format: $(STAMP)
	$(VENV)/bin/ruff format vcppo_jax configs tests benchmarks experiments
	$(VENV)/bin/ruff check --fix vcppo_jax configs tests benchmarks experiments

bench-gae: $(STAMP)
	$(PY) -m benchmarks.gae

bench-sampling: $(STAMP)
	$(PY) -m benchmarks.sampling

# The CPU demo: the tiny VC-PPO experiment end to end (SFT, value pretraining, PPO), then plots.
# Running it again resumes (or, when finished, only redraws the plots).
DEMO := workdirs/demo_vcppo
demo: $(STAMP)
	$(PY) -m vcppo_jax.main --config=configs/vcppo.py:tiny --workdir=$(DEMO)
	$(PY) -m vcppo_jax.plotting --runs vcppo=$(DEMO) --out $(DEMO)/figures
	@echo "metrics:     $(DEMO)/metrics.jsonl (TensorBoard: $(DEMO)/tensorboard)"
	@echo "figures:     $(DEMO)/figures/"
	@echo "checkpoints: $(DEMO)/checkpoints/"

clean:
	rm -rf $(VENV) .pytest_cache
