# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0

.PHONY: demo test lint clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# Pin torch first: an unpinned resolve pulls a multi-GB CUDA build.
	$(PIP) install --quiet $(TORCH)
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e ".[test,hf,examples]"
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e ".[examples]"
	touch $@

demo: $(VENV)/.demo
	$(PY) examples/trm/train.py --quick

# The whole suite, then the trackers' accelerator path (refinements finished one call late)
# over the models and faults that exercise it most, on this CPU.
test: $(VENV)/.test
	$(PY) -m pytest -q -p no:cacheprovider --hypothesis-profile=ci
	$(PY) -m pytest -q -p no:cacheprovider --hypothesis-profile=ci --defer-refinements \
		tests/realistic tests/test_faults.py tests/test_tracker_decisions.py tests/test_robustness.py

lint: $(VENV)/.test
	$(PIP) install --quiet ruff
	$(PY) -m ruff check laser_fx tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
