# The project with the CUDA build of its stack (torch 2.13.0, fbgemm-gpu 1.8.0, torchrec 1.9.2),
# for the kubernetes profile of torchx.yaml (docs/clusters.md):
#
#   docker build -t REGISTRY/recsys:$(git rev-parse --short HEAD) .
#   docker push REGISTRY/recsys:$(git rev-parse --short HEAD)
#
# PyPI's torch wheels for Linux carry their CUDA libraries (nvidia-* wheels), so a plain
# Python base image is enough; the host needs only the NVIDIA driver (the GPU operator or the
# device plugin of the cluster provides it). `make setup ACCEL=cuda` is the same recipe as on
# a GPU host, so the image holds exactly the tested stack. tests/test_dockerfile.py checks the
# set-up step against what this file copies before it, and hadolint (`make lint`) the file.
FROM python:3.11-slim-bookworm

# make runs the set-up; gcc and the C library's headers build the stream's C helper
# (recsys/data/_segments.c), which would silently fall back to NumPy without them, and Triton
# builds its kernel launchers with them when torch.compile compiles the tower on the GPU.
# Debian's bookworm versions, not pinned: its point releases replace them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

ENV VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/workspace/recsys
WORKDIR /workspace/recsys

# What the editable installation reads (pyproject.toml's readme, version and C source), so
# that a change to the rest of the code does not reinstall the stack ...
COPY pyproject.toml Makefile README.md ./
COPY scripts/requirements.py scripts/
COPY recsys/__init__.py recsys/
COPY recsys/data/_segments.c recsys/data/
RUN make setup ACCEL=cuda EXTRAS=cuda VENV=$VENV PYTHON=python3 \
 && rm -rf /root/.cache/pip

# ... then the code (installed in editable mode above, so these are the modules that run).
COPY recsys/ recsys/
COPY components/ components/
COPY configs/ configs/
COPY torchx.yaml .torchxconfig ./

# Jobs run `torchrun -m recsys.stages.<stage>` (components/); this checks the stack imports and
# that the C helper was built.
RUN python -c "import torch, torchrec, fbgemm_gpu, recsys.data._segments; \
print(torch.__version__, torch.version.cuda)"
