# Two commands a newcomer needs: `make demo` and `make test`.
# Both create ./.venv on first use (torch pinned: an unpinned torch pulls a multi-GB CUDA build);
# `make test` also creates ./.venv-floor, with the lowest transformers setup.cfg admits.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,plot,eval
PYTEST_ARGS ?=
# The lowest transformers setup.cfg admits is tested too, in a second venv (setup.cfg owns the number).
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_TRANSFORMERS := transformers==$(shell sed -n 's/^ *transformers>=\([0-9.]*\).*/\1/p' setup.cfg)

.PHONY: venv venv-floor test test-newest test-floor test-fast demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH_PINS)
	touch $@

venv: $(VENV)/.installed

$(FLOOR_VENV)/.installed: setup.cfg pyproject.toml
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q -U pip
	$(FLOOR_PY) -m pip install -q $(TORCH_PINS)
	$(FLOOR_PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH_PINS) "$(FLOOR_TRANSFORMERS)"
	touch $@

venv-floor: $(FLOOR_VENV)/.installed

# CI: everything on the newest transformers pip resolves, then the fast suite on the lowest admitted one
test: test-newest test-floor

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
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info
