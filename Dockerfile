# syntax=docker/dockerfile:1
# seqserve images, one file, three targets:
#   trainer     Python + PyTorch (CPU wheel) + seqserve[train]: trains and exports the default model
#   server      Python + the serving core set only (ONNX Runtime, Numba, gRPC): no PyTorch
#   server-gpu  NVIDIA CUDA 13 runtime + cuDNN base, onnxruntime-gpu and numba-cuda[cu13]: no PyTorch
# Build one:   docker build --target server -t seqserve-server:0.1.0 .
# Usually built through docker-compose.yml (`docker compose build`).
#
# Base images are pinned by tag; override with --build-arg to move them.
# onnxruntime-gpu 1.31 links CUDA 13 (libcudart.so.13, libcublas.so.13) and
# cuDNN 9, hence the CUDA 13 cuDNN runtime base for server-gpu.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# ---- wheel: build the project once for trainer and server ------------------
# The wheel carries a C extension (serving/_hotpath.c, the streaming hot
# path), so it is built against the Python it will run on: this stage for
# the python-base images, wheel-gpu for server-gpu. The compiler stays here.
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m zipfile -l /wheels/seqserve-*.whl | grep -q "serving/_hotpath"

# ---- python-base: what trainer and server share ----------------------------
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache
# One unprivileged user with a fixed uid in every image, and the volume mount
# points owned by it: a fresh named volume takes the mount point's owner, so
# the trainer can write /models and the server can write /state.
RUN groupadd --gid 10001 seqserve \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin seqserve \
 && mkdir -p /models /runs /state \
 && chown seqserve:seqserve /models /runs /state
WORKDIR /app

# ---- trainer ----------------------------------------------------------------
FROM python-base AS trainer
# The CPU wheel from PyTorch's own index: PyPI's default torch is the CUDA
# build (several GB) that a trainer on a CPU box never uses.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0
COPY --from=wheel /wheels /wheels
RUN pip install "$(ls /wheels/seqserve-*.whl)[train]" && rm -rf /wheels
COPY deploy/ deploy/
USER seqserve
CMD ["python", "deploy/train_default.py", "--repo", "/models", "--runs", "/runs"]

# ---- server (CPU) -------------------------------------------------------------
FROM python-base AS server
COPY --from=wheel /wheels /wheels
# The core dependency set only; the build fails if torch slipped in.
RUN pip install /wheels/seqserve-*.whl && rm -rf /wheels \
 && ! python -c "import torch" 2>/dev/null
COPY deploy/ deploy/
USER seqserve
EXPOSE 50051 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "deploy/healthcheck.py", "--port", "50051"]
STOPSIGNAL SIGTERM
CMD ["seqserve", "serve", "--repo", "/models", "--host", "0.0.0.0", "--port", "50051", \
     "--metrics-port", "8002", "--state-dir", "/state"]

# ---- wheel-gpu: the same wheel, for server-gpu's Python (Ubuntu's 3.12) ---------
FROM ${CUDA_IMAGE} AS wheel-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/build
WORKDIR /src
COPY . .
RUN /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/build/bin/python -m zipfile -l /wheels/seqserve-*.whl | grep -q "serving/_hotpath"

# ---- server-gpu -----------------------------------------------------------------
FROM ${CUDA_IMAGE} AS server-gpu
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
# Ubuntu's python3 (3.12) in a venv: the system one is externally managed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && groupadd --gid 10001 seqserve \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin seqserve \
 && mkdir -p /models /state \
 && chown seqserve:seqserve /models /state
WORKDIR /app
COPY --from=wheel-gpu /wheels /wheels
# numba-cuda[cu13] brings NVVM and NVRTC as wheels: the runtime base image
# has the CUDA libraries ONNX Runtime links but not the compiler pieces Numba
# needs to JIT the streaming cell kernels.
RUN pip install /wheels/seqserve-*.whl "numba-cuda[cu13]==0.30.4" && rm -rf /wheels \
 && ! python -c "import torch" 2>/dev/null
COPY deploy/ deploy/
USER seqserve
EXPOSE 50051 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "deploy/healthcheck.py", "--port", "50051"]
STOPSIGNAL SIGTERM
CMD ["seqserve", "serve", "--repo", "/models", "--host", "0.0.0.0", "--port", "50051", \
     "--metrics-port", "8002", "--state-dir", "/state", "--device", "cuda"]
