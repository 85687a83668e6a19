# syntax=docker/dockerfile:1
# The one flashops image: the operator, the trainers, the predictor and the lineage API.
#
#   docker build -t ghcr.io/flashops/flashops:0.1.0 .                                # CPU (torch from the CPU index)
#   docker build --build-arg FLAVOR=cuda -t ghcr.io/flashops/flashops:0.1.0-cuda .  # CUDA (torch from PyPI)
#
# Entry points (no ENTRYPOINT, so a pod's `command` is used as written):
#   flashops operator                                    the kopf operator (Helm chart)
#   flashops lineage serve --db URL --host 0.0.0.0       the lineage HTTP API (Helm chart)
#   torchrun -m flashops.trainers --spec FILE            a trainer rank (PyTorchJob / TrainJob pods)
#   python -m flashops.serving --model URI               the KServe predictor (InferenceService)
#
# The chart's image.flavor picks the tag trainer and predictor pods get: <tag> or <tag>-cuda.
# Not built in this repo's CI (no container engine on its machines); tests/helm/test_dockerfile.py
# checks that this file copies everything the package needs and that the wheel builds from that context.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a venv with flashops in it
FROM ${PYTHON_IMAGE} AS build
ARG FLAVOR=cpu
# Override to use a mirror, or another CUDA build (e.g. https://download.pytorch.org/whl/cu130).
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/flashops \
 && /opt/flashops/bin/pip install -q "pip==26.3" "setuptools==80.9.0" "wheel==0.45.1"
WORKDIR /src
COPY constraints.txt ./
# torch first, from the index the flavor needs; the constraint torch==2.13.0 also matches 2.13.0+cpu.
RUN case "${FLAVOR}" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *)    echo "FLAVOR=${FLAVOR} is not cpu or cuda: pass --build-arg FLAVOR=cpu|cuda" >&2; exit 2 ;; \
    esac \
 && /opt/flashops/bin/pip install -c constraints.txt --index-url "${index}" --extra-index-url https://pypi.org/simple "torch==2.13.0"
COPY pyproject.toml setup.py README.md ./
COPY api/ api/
COPY model/ model/
COPY trainers/ trainers/
COPY serving/ serving/
COPY operator/ operator/
COPY storage/ storage/
COPY cli/ cli/
# Everything else at the pinned versions; torch is already satisfied and stays the flavor's build.
RUN /opt/flashops/bin/pip install -c constraints.txt . \
 && /opt/flashops/bin/python -c "import torch, flashops.cli.app; print('torch', torch.__version__)"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
ARG FLAVOR=cpu
LABEL org.opencontainers.image.title="flashops" \
      org.opencontainers.image.description="flashops operator, trainers, predictor and lineage API" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.flashops.flavor="${FLAVOR}"
# CUDA: triton compiles its launcher stubs with a C compiler at first use. The CUDA libraries come
# with the torch wheels; the driver comes from the node (NVIDIA container toolkit).
RUN if [ "${FLAVOR}" = cuda ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --gid 10001 flashops && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin flashops
COPY --from=build /opt/flashops /opt/flashops
# HOME and every cache under /tmp: pods run with a read-only root filesystem and an emptyDir on /tmp.
ENV PATH=/opt/flashops/bin:${PATH} \
    HOME=/tmp \
    FLASHOPS_HOME=/tmp/flashops \
    HF_HOME=/tmp/huggingface \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
CMD ["flashops", "--help"]
