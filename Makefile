# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-gpu clean

install: $(VENV)/.installed

# torch first, pinned: pip takes the CPU wheel on this machine instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/sentiment-ray demo

# Two test processes (pytest-xdist), each with its own private Ray, a whole test file at a time: on 2 cores the
# Ray tests leave one process waiting on start-ups and actors often enough that two take ~40% less wall time.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --durations=30

# On the GPU machine (needs the [gpu] extra): the CUDA tests only.
test-gpu:
	$(PY) -m pytest -q -ra -m gpu

clean:
	rm -rf $(VENV) demo_output .pytest_cache
