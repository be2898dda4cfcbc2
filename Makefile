# Two commands a newcomer needs: `make demo` and `make test`.
# Both create ./.venv on first use (torch pinned: an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,plot,eval
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH_PINS)
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/llava-manager demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
