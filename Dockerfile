# syntax=docker/dockerfile:1
#
# gptserve's images: one Dockerfile, three targets (`docker build --target NAME .`; docker-compose.yml builds them).
#   gpu     the server on onnxruntime-gpu, on NVIDIA's CUDA runtime image (the default: the last stage)
#   cpu     the server on onnxruntime (CPU), on python:3.11-slim
#   export  the exporter: `cpu` plus torch (CPU build); writes certified artifacts into /cache
# The servers never import torch. Every image runs as the unprivileged user gptserve (uid 10001) and keeps models
# and artifacts in /cache ($GPTSERVE_CACHE), a named volume in docker-compose.yml.
#
# CUDA pairing: onnxruntime-gpu 1.31.1 (the version of pyproject.toml's `onnxruntime` pin) is built for CUDA 13.x
# and cuDNN 9.x: its wheel's `cuda` and `cudnn` extras ask for nvidia-cuda-runtime ~= 13.0 and
# nvidia-cudnn-cu13 ~= 9.0. Hence NVIDIA's CUDA 13.0 runtime image with cuDNN 9. The host needs a driver for
# CUDA 13 and the NVIDIA Container Toolkit. tests/deploy checks that these pins move together.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9
ARG PYTHON_VERSION=3.11
# The same versions as pyproject.toml's pins (tests/deploy/test_dockerfile.py compares them).
ARG ONNXRUNTIME_VERSION=1.31.1
ARG TORCH_VERSION=2.13.0

FROM ${UV_IMAGE} AS uv

# The project as one pure-Python wheel. Its build generates the gRPC stubs from protos/ (setup.py, with grpcio-tools
# from pyproject's build-system.requires; the build context leaves out the checkout's own, see .dockerignore).
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/gptserve/bin:$PATH PYTHONUNBUFFERED=1 GPTSERVE_CACHE=/cache
# /cache belongs to gptserve so that a fresh named volume mounted there inherits that owner.
RUN groupadd --gid 10001 gptserve \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin gptserve \
 && install -d -o 10001 -g 10001 /cache \
 && python -m venv /opt/gptserve
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/gptserve-*.whl \
 && python -c "import gptserve.v1.generation_pb2_grpc, gptserve.service.server, onnxruntime"
COPY deploy/healthcheck.py /opt/gptserve-deploy/healthcheck.py
USER 10001:10001
WORKDIR /home/gptserve
EXPOSE 50051 9464
ENTRYPOINT ["gptserve"]
CMD ["serve", "--host", "0.0.0.0", "--metrics-port", "9464", "--metrics-host", "0.0.0.0", "--provider", "cpu"]

FROM cpu AS export
ARG TORCH_VERSION
USER 0:0
# torch from PyTorch's CPU index: the export runs on the CPU, and PyPI's Linux torch wheel is the CUDA build with
# gigabytes of CUDA libraries. `2.13.0+cpu` satisfies the `torch==2.13.0` pin; the export extra then brings
# torch's own requirements and onnxscript from PyPI.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install "$(echo /wheels/gptserve-*.whl)[export]" \
 && python -c "import torch, gptserve.export.exporter"
COPY deploy/export-once.py /opt/gptserve-deploy/export-once.py
USER 10001:10001
ENTRYPOINT ["python", "/opt/gptserve-deploy/export-once.py"]
CMD ["smollm2-135m-instruct"]

# Ubuntu 24.04 has Python 3.12 and the project is pinned to 3.11: uv installs a standalone CPython 3.11 under
# /opt/python, and the venv on it gets onnxruntime-gpu in place of onnxruntime (same module, other build).
FROM ${CUDA_IMAGE} AS gpu-python
ARG PYTHON_VERSION
ARG ONNXRUNTIME_VERSION
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON_PREFERENCE=only-managed UV_NO_CACHE=1 VIRTUAL_ENV=/opt/gptserve
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    uv python install "${PYTHON_VERSION}" \
 && uv venv --python "${PYTHON_VERSION}" /opt/gptserve \
 && uv pip install /wheels/gptserve-*.whl \
 && uv pip uninstall onnxruntime \
 && uv pip install "onnxruntime-gpu==${ONNXRUNTIME_VERSION}" \
 && /opt/gptserve/bin/python -c "import onnxruntime as ort, gptserve.service.server; \
assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers()"

FROM ${CUDA_IMAGE} AS gpu
ENV PATH=/opt/gptserve/bin:$PATH PYTHONUNBUFFERED=1 GPTSERVE_CACHE=/cache
RUN groupadd --gid 10001 gptserve \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin gptserve \
 && install -d -o 10001 -g 10001 /cache
COPY --from=gpu-python /opt/python /opt/python
COPY --from=gpu-python /opt/gptserve /opt/gptserve
COPY deploy/healthcheck.py /opt/gptserve-deploy/healthcheck.py
USER 10001:10001
WORKDIR /home/gptserve
EXPOSE 50051 9464
ENTRYPOINT ["gptserve"]
CMD ["serve", "--host", "0.0.0.0", "--metrics-port", "9464", "--metrics-host", "0.0.0.0", "--provider", "cuda"]
