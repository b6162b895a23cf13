# tiny-audio trainer image (RunPod or any Docker/podman host).
#
#   docker run --gpus all -e EXP=mlp -e HF_TOKEN -v /data:/workspace IMAGE          # train
#   docker run IMAGE check | --help                                                 # validate / list variables
#
# Default base: NVIDIA's smallest CUDA 12.8 image on Ubuntu 24.04 (apt python3 = 3.12, which the torch 2.13.0
# cu128 wheel supports): the CUDA runtime, the forward-compatibility libraries and the NVIDIA_* variables the
# container toolkit reads to mount the driver. cuBLAS, cuDNN, NCCL and the rest come with torch's own wheels
# (nvidia-*-cu12), so a -runtime or -cudnn-runtime base would only hold a second copy of them (~4 GB more).
# Any apt-based image with python3 >= 3.11 works as BASE_IMAGE (the tests build on a Debian bookworm base they
# make themselves, with the CPU torch wheel from a bind-mounted folder, see docker/README.md). A -devel base is
# needed only to compile extras (EXTRA_PIP_PACKAGES such as flash-attn).
ARG BASE_IMAGE=docker.io/nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Package versions differ between the Ubuntu (CUDA) and Debian (test) bases, so apt packages cannot be pinned to
# one version here; the base image itself is pinned by tag, and the Python tools below by version.
# g++ and python3-dev are what torch.compile needs at run time (training.compile): Triton builds its GPU launcher
# with the C compiler against Python's headers, and Inductor's CPU kernels are C++ built with g++.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# ---------------------------------------------------------------------------------------------------------------
# Dependencies only: this layer depends on pyproject.toml alone, so a code change rebuilds in seconds.
FROM base AS deps

# Where torch comes from. Default: PyTorch's CUDA 12.8 index (matches the base image). Empty: PyPI, or a local
# wheel folder bind-mounted into the build and named by PIP_FIND_LINKS (how the CPU test build gets torch).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PIP_FIND_LINKS
# Optional extra packages baked in, e.g. "flash-attn==2.8.3" for model.attn_implementation=flash_attention_2
# (needs a -devel BASE_IMAGE to compile). The default sdpa attention's fused kernels ship inside torch itself.
ARG EXTRA_PIP_PACKAGES=""

WORKDIR /app
COPY pyproject.toml docker/constraints.txt ./
# The pip CA bundle is an OPTIONAL build secret (only where TLS is intercepted); it is mounted for this one
# command and never written to a layer.
RUN --mount=type=secret,id=pip_ca,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install pip==25.3 setuptools==80.9.0 \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements.txt -c constraints.txt \
        $EXTRA_PIP_PACKAGES \
    && rm /tmp/requirements.txt \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---------------------------------------------------------------------------------------------------------------
FROM deps AS runtime

# Models, data and outputs live on RunPod's persistent volume (/workspace), so a restarted pod keeps its cache
# and checkpoints. The CLI writes OUTPUT_DIR=/workspace/outputs/<experiment> when /workspace exists.
ENV HF_HOME=/workspace/.cache/huggingface \
    WANDB_DIR=/workspace \
    ON_FINISH=exit

COPY . /app
# Editable install: the experiment YAMLs live in /app/configs, next to the package. No network needed here.
RUN pip install --no-deps --no-build-isolation -e /app \
    && chmod +x /app/docker/start.sh \
    && mkdir -p /workspace \
    && tiny-audio --help > /dev/null

WORKDIR /workspace
# tini is PID 1: it reaps zombies and forwards SIGTERM to start.sh, which execs (or forwards to) the trainer.
ENTRYPOINT ["/usr/bin/tini", "--", "/app/docker/start.sh"]
CMD []

# Last, so a new revision does not invalidate the layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/tiny-audio/tiny-audio
LABEL org.opencontainers.image.title="tiny-audio" \
      org.opencontainers.image.description="Trains a projector between a frozen GLM-ASR encoder and a frozen Qwen3 decoder" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT"
