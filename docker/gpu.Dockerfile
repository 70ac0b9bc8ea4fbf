# rayd on NVIDIA GPUs: vllm (CUDA), NCCL, bf16. Build from the repo root:
#   docker build -f docker/gpu.Dockerfile -t rayd:gpu .
# Not built in this repository's CI (no Docker engine or GPU there); tests/unit/test_launch_files.py
# checks that its pins match pyproject.toml. torch 2.13.0's PyPI wheels are CUDA 13 builds that
# bring their own CUDA libraries; the host needs an NVIDIA driver >= 580. The devel base has
# nvcc, which DeepSpeed's ops and vLLM's FlashInfer kernels use when they compile on first use.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu22.04
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1
# Python 3.11 (what rayd is tested on) from the deadsnakes archive, as vLLM's own images do;
# -dev because Triton compiles kernels against Python.h.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends software-properties-common ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3.11 python3.11-venv python3.11-dev \
      build-essential libnuma1 git \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
# KubeRay starts Ray with `bash -lc`, a login shell that re-reads /etc/profile: the venv must be
# on PATH there as well as in ENV.
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv
RUN echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/rayd-venv.sh
WORKDIR /opt/rayd
# The two big pins first, in their own layer, so code changes do not reinstall CUDA torch and
# vLLM. They must equal pyproject.toml's torch pin and its `gpu` extra (a unit test checks).
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir torch==2.13.0 vllm==0.32.0
COPY . .
RUN pip install --no-cache-dir -e ".[gpu]"
ENTRYPOINT ["python", "-m", "rayd", "train"]
