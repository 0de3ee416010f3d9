# Set-up and checks. Every target creates .venv when it is missing and installs the project
# with the tested stack; a second run with nothing changed installs nothing.
#
#   make setup               CPU hosts: torch 2.13.0 (CPU build), fbgemm-gpu-cpu 1.8.0, torchrec 1.9.2
#   make setup ACCEL=cuda    GPU hosts: the CUDA builds of torch 2.13.0 and fbgemm-gpu 1.8.0
#   make test                set-up, then the test suite
#   make lint                set-up, then ruff
#   make doctor              set-up, then `recsys doctor`

ACCEL   ?= cpu
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed-$(ACCEL)
PYTEST_ARGS ?=

# Where pip finds the CPU build of torch: a directory of local wheels when it holds one for
# this Python, otherwise PyTorch's CPU index. (PyPI's torch wheel for Linux is the CUDA build.)
TORCH_WHEELS    ?= /opt/wheels
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PY_TAG := cp$(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])')
ifeq ($(ACCEL),cpu)
  ifneq ($(wildcard $(TORCH_WHEELS)/torch-2.13.0*-$(PY_TAG)-*.whl),)
    TORCH_SOURCE := --find-links $(TORCH_WHEELS)
  else
    TORCH_SOURCE := --extra-index-url $(TORCH_CPU_INDEX)
  endif
else ifeq ($(ACCEL),cuda)
  TORCH_SOURCE :=
else
  $(error ACCEL must be cpu or cuda, not '$(ACCEL)')
endif

.PHONY: setup test lint doctor

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torchrec's metadata names the CUDA-only fbgemm-gpu, so torchrec goes in with --no-deps and
# its other requirements with the rest (scripts/requirements.py splits the two groups).
$(STAMP): pyproject.toml Makefile scripts/requirements.py | $(PY)
	@for other in $(VENV)/.installed-*; do \
	  if [ -e "$$other" ] && [ "$$other" != "$(STAMP)" ]; then \
	    echo "$(VENV) holds the $${other##*-} build; for ACCEL=$(ACCEL) remove it (rm -rf $(VENV)) or pass VENV=.venv-$(ACCEL)" >&2; \
	    exit 1; fi; done
	rm -f $(STAMP)
	$(PIP) install --quiet packaging
	$(PIP) install --quiet --no-deps -e .
	$(PY) scripts/requirements.py no-deps > $(VENV)/requirements-no-deps.txt
	$(PIP) install --quiet --no-deps -r $(VENV)/requirements-no-deps.txt
	$(PY) scripts/requirements.py deps --extras $(ACCEL),dev > $(VENV)/requirements.txt
	@echo "(pip may say 'torchrec requires fbgemm-gpu, which is not installed': expected on CPU hosts, where fbgemm-gpu-cpu provides the same package)"
	$(PIP) install --quiet $(TORCH_SOURCE) -r $(VENV)/requirements.txt
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

doctor: setup
	$(VENV)/bin/recsys doctor
