"""Streaming the student's weights to vLLM engines in buckets, through vLLM's weight-transfer API.

Both sides of a sync compute the same plan (`plan_buckets`) from the tensors' names, dtypes and
shapes and the bucket size, so only that metadata travels with the update; the bytes go as one
broadcast per bucket over a private process group whose rank 0 is learner rank 0 and whose other
ranks are every rank of every engine. A tensor larger than a bucket travels in pieces (vLLM's own
packing never splits one).

The engine side (`StreamWeightTransferEngine`) is registered with vLLM's factory by
`rayd.rollout.vllm_ext`, which every engine worker process imports, and runs inside vLLM's worker
between `start_weight_update` and `finish_weight_update`: vLLM's layerwise reload puts each layer
back in checkpoint shapes, `model.load_weights` takes the buckets one by one, and each layer is
post-processed (the CPU GEMM prepack included) as soon as its last tensor is in. What this
module adds to vLLM, each found by a prototype (docs/design/weight-stream.md):
- a fresh receive buffer per bucket: the layerwise loader keeps views of it until a layer is
  complete, so a reused buffer corrupts weights silently;
- the loaded names are compared with the model's parameters (vLLM only warns about a layer that
  got nothing, and keeps its old weights);
- `finish_weight_update` never raises (vLLM's worker would refuse every later update): the
  result is read with `vllm_ext`'s `rayd_stream_report`;
- CPU torch has no accelerator to synchronise, so `update_weights` is overridden;
- on a failed transfer the group is dropped at once, so every peer's pending receive fails in
  milliseconds ("connection closed") instead of waiting for the deadline.

This module is imported in engine workers and learner rank 0 only; vLLM's pieces are imported
inside the functions that need them, so the plan is importable (and tested) without vLLM.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

ALIGN = 16  # bytes; every whole tensor starts at a multiple, so `.view(dtype)` is legal
BACKEND = "rayd_stream"  # the name registered with vLLM's WeightTransferEngineFactory

# (tensor index, first byte, end byte, offset in the bucket)
Piece = tuple[int, int, int, int]


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    pieces: list[Piece]


def nbytes_of(dtype_name: str, shape: list[int]) -> int:
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel * getattr(torch, dtype_name).itemsize


def plan_buckets(
    dtype_names: list[str], shapes: list[list[int]], bucket_bytes: int
) -> list[Bucket]:
    """The buckets of one sync, in tensor order.

    A tensor that fits in a bucket stays whole (a new bucket starts when it does not fit in what
    is left of the current one); a larger one starts a bucket of its own and is cut into
    bucket-sized pieces, the last of which shares its bucket with the tensors that follow.
    Deterministic: sender and receivers compute it apart and must agree byte for byte.
    """
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be at least {ALIGN}, got {bucket_bytes}")
    buckets: list[Bucket] = []
    current: list[Piece] = []
    used = 0

    def close() -> None:
        nonlocal current, used
        if current:
            buckets.append(Bucket(used, current))
        current, used = [], 0

    for index, (dtype_name, shape) in enumerate(zip(dtype_names, shapes, strict=True)):
        size = nbytes_of(dtype_name, shape)
        if size == 0:
            current.append((index, 0, 0, used))
            continue
        start = -(-used // ALIGN) * ALIGN
        if size <= bucket_bytes:
            if start + size > bucket_bytes:
                close()
                start = 0
            current.append((index, 0, size, start))
            used = start + size
            continue
        close()
        for lo in range(0, size, bucket_bytes):
            hi = min(size, lo + bucket_bytes)
            current.append((index, lo, hi, 0))
            used = hi - lo
            if used == bucket_bytes:
                close()
    close()
    return buckets


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


@dataclass
class StreamInit:
    """How an engine joins the group (`init_weight_transfer_engine`'s init_info)."""

    master_address: str
    master_port: int
    rank_offset: int  # this engine's first rank in the group (rank 0 is the sender)
    world_size: int
    timeout_s: float


@dataclass
class StreamUpdate:
    """One sync's metadata (`update_weights`' update_info): the plan is computed from it."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int
    version: int


@dataclass
class StreamReport:
    """What the last sync did on one engine rank, read back with `rayd_stream_report`."""

    rank: int = -1
    version: int | None = None
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)
    error: str | None = None


def join_group(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """A private gloo group (vLLM's stateless helper: it does not touch torch.distributed's
    default group, which DeepSpeed owns in a learner). Blocks until all ranks have arrived."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        address, port, rank, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s)
    )


def drop_group(group: Any) -> None:
    """Close the group's connections now: every peer blocked in a broadcast fails at once."""
    if group is None:
        return
    with contextlib.suppress(Exception):  # already broken: its connections are what we want closed
        group.shutdown()
    del group
    gc.collect()


def send_buckets(
    group: Any,
    tensors: Any,
    dtype_names: list[str],
    shapes: list[list[int]],
    bucket_bytes: int,
    timeout_s: float,
) -> tuple[int, int]:
    """Rank 0's side: broadcast every bucket of the plan. `tensors` yields the tensors in plan
    order, one at a time (a ZeRO-3 learner gathers each as it is asked for), so at most one
    bucket being filled, one in flight and one tensor are held. Returns (bytes, buckets)."""
    timeout = timedelta(seconds=timeout_s)
    plan = plan_buckets(dtype_names, shapes, bucket_bytes)
    source = iter(tensors)
    held: dict[int, torch.Tensor] = {}  # a tensor cut into pieces, until its last one is sent
    sent = 0
    in_flight: Any = None

    def tensor(index: int) -> torch.Tensor:
        if index not in held:
            held[index] = flat_bytes(next(source))
        return held[index]

    for bucket in plan:
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8)
        for index, lo, hi, offset in bucket.pieces:
            data = tensor(index)
            buffer[offset : offset + hi - lo].copy_(data[lo:hi])
            if hi == data.numel():
                del held[index]
        work = group.broadcast(buffer, 0, timeout)
        if in_flight is not None:  # the previous bucket left while this one was packed
            in_flight.wait()
        in_flight = work
        sent += bucket.nbytes
    if in_flight is not None:
        in_flight.wait()
    return sent, len(plan)


def engine_class() -> type:
    """The vLLM worker-side engine; built on first use, so the plan needs no vLLM."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    class StreamWeightTransferEngine(WeightTransferEngine):  # type: ignore[type-arg]
        init_info_cls = StreamInit
        update_info_cls = StreamUpdate
        supports_draft_weight_update = False

        def __init__(self, config: Any, vllm_config: Any, device: Any, model: Any) -> None:
            super().__init__(config, vllm_config, device, model)
            self.group: Any = None
            self.rank = -1
            self.timeout = timedelta(seconds=300)
            self.report = StreamReport()
            self._loaded: set[str] = set()
            self._started = 0.0

        def init_transfer_engine(self, init_info: StreamInit) -> None:
            drop_group(self.group)
            self.group = None
            parallel = self.parallel_config
            self.rank = init_info.rank_offset + parallel.rank
            self.timeout = timedelta(seconds=init_info.timeout_s)
            self.group = join_group(
                init_info.master_address,
                init_info.master_port,
                self.rank,
                init_info.world_size,
                init_info.timeout_s,
            )

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            self._started = time.perf_counter()
            self.report = StreamReport(rank=self.rank)
            self._loaded = set()
            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # The base class ends with torch.accelerator.synchronize(), which raises on CPU.
            try:
                self.receive_weights(self.parse_update_info(update_info))
            except BaseException as exc:
                self.report.error = f"{exc.__class__.__name__}: {exc}"
                drop_group(self.group)  # the peers' broadcasts fail now, not at the deadline
                self.group = None
                raise
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def receive_weights(self, update_info: StreamUpdate) -> None:
            if self.group is None:
                raise RuntimeError("no weight-stream group: init_weight_transfer_engine first")
            info = update_info
            dtypes = [getattr(torch, name) for name in info.dtype_names]
            partial: dict[int, tuple[torch.Tensor, int]] = {}
            for bucket in plan_buckets(info.dtype_names, info.shapes, info.bucket_bytes):
                # A fresh buffer every time: the layerwise loader keeps views into it.
                buffer = torch.empty(bucket.nbytes, dtype=torch.uint8)
                self.group.broadcast(buffer, 0, self.timeout).wait()
                batch = []
                for index, lo, hi, offset in bucket.pieces:
                    size = nbytes_of(info.dtype_names[index], info.shapes[index])
                    name, shape = info.names[index], info.shapes[index]
                    if lo == 0 and hi == size:
                        batch.append(
                            (name, buffer[offset : offset + size].view(dtypes[index]).view(shape))
                        )
                        continue
                    target, got = partial.get(index) or (torch.empty(shape, dtype=dtypes[index]), 0)
                    flat_bytes(target)[lo:hi].copy_(buffer[offset : offset + hi - lo])
                    got += hi - lo
                    if got == size:
                        partial.pop(index, None)
                        batch.append((name, target))
                    else:
                        partial[index] = (target, got)
                if batch:
                    self._loaded.update(self.model.load_weights(batch) or ())
                self.report.bytes += bucket.nbytes
                self.report.buckets += 1
            if partial:
                raise RuntimeError(f"{len(partial)} tensors arrived incomplete")
            self.report.version = info.version

        def finish_weight_update(self) -> None:
            # Never raises (see the module doc); rayd_stream_report carries the verdict.
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            from rayd.rollout.vllm_ext import repack_cpu_gemm

            try:
                finalize_layerwise_reload(self.model, self.model_config)
                expected = {name for name, _ in self.model.named_parameters()}
                self.report.missing = sorted(expected - self._loaded)
                if not torch.cuda.is_available():
                    repack_cpu_gemm(self.model)
            except Exception as exc:
                self.report.error = f"{exc.__class__.__name__}: {exc}"
            self.report.seconds = time.perf_counter() - self._started

        def abort(self) -> None:
            """End a session a broken sync left half-way: the layers that had started loading
            are still in layerwise state (meta tensors, buffered loads), and a later
            initialize_layerwise_reload would skip them."""
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            drop_group(self.group)
            self.group = None
            try:
                finalize_layerwise_reload(self.model, self.model_config)
            except Exception as exc:  # the weights are a mix either way: the caller reloads all
                self.report.error = f"abort: {exc.__class__.__name__}: {exc}"

        def shutdown(self) -> None:
            drop_group(self.group)
            self.group = None

    return StreamWeightTransferEngine


_ENGINE: type | None = None


def __getattr__(name: str) -> Any:
    """`StreamWeightTransferEngine`, for vLLM's factory (registered lazily by module and name)."""
    global _ENGINE
    if name == "StreamWeightTransferEngine":
        if _ENGINE is None:
            _ENGINE = engine_class()
        return _ENGINE
    raise AttributeError(name)
