"""The only module that knows whether we run on CUDA or CPU.

Everything else asks this module for the torch.distributed backend, the dtype and the DeepSpeed
accelerator, so the same config runs on a laptop CPU (gloo, fp32) and a GPU cluster (NCCL, bf16).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rayd.noise import quiet_known_noise


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" | "cpu"
    dist_backend: str  # "nccl" | "gloo"
    ds_accelerator: str  # value for DS_ACCELERATOR
    default_dtype: torch.dtype

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device(f"cuda:{local_rank}") if self.is_gpu else torch.device("cpu")


def detect() -> Device:
    """The device of *this* process (a Ray actor given a GPU sees CUDA; the driver may not)."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return Device("cuda", "nccl", "cuda", torch.bfloat16 if bf16 else torch.float16)
    # vLLM-CPU and gloo are exact in fp32; bf16 on CPU is slow on machines without AMX.
    return Device("cpu", "gloo", "cpu", torch.float32)


def resolve_dtype(name: str, device: Device) -> torch.dtype:
    if name == "auto":
        return device.default_dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def prepare_process(device: Device, threads: int | None = None) -> None:
    """Process-wide settings that must happen before DeepSpeed or vLLM import their backends,
    and the known library noise quieted (a local Ray's workers get no setup hook)."""
    quiet_known_noise()
    os.environ.setdefault("DS_ACCELERATOR", device.ds_accelerator)
    if threads and not device.is_gpu:
        # Several actors share few cores: unbounded intra-op threads make them fight.
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
