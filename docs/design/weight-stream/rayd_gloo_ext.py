"""Prototype of rayd's gloo weight-transfer engine for vLLM 0.32 (issue 39). NOT rayd code.

Imported by vLLM's worker process as `worker_extension_cls` module (like rayd/rollout/vllm_ext.py),
which is what registers the engine with vLLM's factory before `Worker.load_model` builds it.

Wire format (both sides compute it from the same metadata and bucket size, `plan_buckets`):
one `pg.broadcast` of a flat uint8 tensor per bucket, from rank 0 (the trainer).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

log = logging.getLogger("rayd.weight_stream")
ALIGN = 16  # bytes; every whole tensor starts at a multiple, so `.view(dtype)` is legal


# --- the plan: shared by sender and receiver -------------------------------------------------


def nbytes_of(dtype_name: str, shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def plan_buckets(
    dtype_names: list[str], shapes: list[list[int]], bucket_bytes: int
) -> list[tuple[int, list[tuple[int, int, int, int]]]]:
    """[(bucket_nbytes, [(tensor_index, byte_lo, byte_hi, offset_in_bucket), ...]), ...].

    Tensors stay whole when they fit in one bucket (a new bucket starts when the next one does
    not fit in what is left); a tensor larger than a bucket starts a bucket of its own and is cut
    into bucket-sized pieces, the last of which shares its bucket with what follows.
    """
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be >= {ALIGN}, got {bucket_bytes}")
    buckets: list[tuple[int, list[tuple[int, int, int, int]]]] = []
    cur: list[tuple[int, int, int, int]] = []
    used = 0

    def close() -> None:
        nonlocal cur, used
        if cur:
            buckets.append((used, cur))
        cur, used = [], 0

    for i, (dt, shape) in enumerate(zip(dtype_names, shapes, strict=True)):
        n = nbytes_of(dt, shape)
        start = -(-used // ALIGN) * ALIGN
        if n <= bucket_bytes:
            if start + n > bucket_bytes:
                close()
                start = 0
            cur.append((i, 0, n, start))
            used = start + n
            continue
        close()
        lo = 0
        while lo < n:
            hi = min(n, lo + bucket_bytes)
            cur.append((i, lo, hi, 0))
            used = hi - lo
            lo = hi
            if used == bucket_bytes:
                close()
    close()
    return buckets


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def send_buckets(
    pg: Any, tensors: list[torch.Tensor], dtype_names: list[str], shapes: list[list[int]],
    bucket_bytes: int, timeout: timedelta,
) -> tuple[int, int]:
    """Trainer side: broadcast every bucket from rank 0. Returns (bytes, buckets)."""
    sent = 0
    plan = plan_buckets(dtype_names, shapes, bucket_bytes)
    in_flight = None  # (buffer, work): one broadcast on gloo's thread while the next is packed
    for nbytes, pieces in plan:
        if len(pieces) == 1 and pieces[0][3] == 0:
            i, lo, hi, _ = pieces[0]
            buf = _flat_bytes(tensors[i])[lo:hi]  # a piece of the tensor itself: no copy
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            for i, lo, hi, off in pieces:
                buf[off : off + hi - lo].copy_(_flat_bytes(tensors[i])[lo:hi])
        work = pg.broadcast(buf, 0, timeout)
        if in_flight is not None:
            in_flight[1].wait()
        in_flight = (buf, work)
        sent += nbytes
    if in_flight is not None:
        in_flight[1].wait()
    return sent, len(plan)


# --- the engine (worker side) -----------------------------------------------------------------


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 300.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int
    version: int | None = None
    # prototype switches, to show the test can fail
    reuse_buffer: bool = False


@dataclass
class SyncStats:
    version: int | None = None
    bytes: int = 0
    buckets: int = 0
    tensors: int = 0
    seconds: float = 0.0
    recv_seconds: float = 0.0
    wire_seconds: float = 0.0  # inside broadcast().wait()
    load_seconds: float = 0.0  # inside model.load_weights (incl. layerwise processing)
    missing: list[str] = field(default_factory=list)
    skip_finalize: bool = False


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: Any = None
        self.timeout = timedelta(seconds=300)
        self.rank = -1
        self.stats = SyncStats()
        self._loaded: set[str] = set()
        self._t0 = 0.0

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        pc = self.parallel_config
        self.rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.timeout = timedelta(seconds=init_info.timeout_s)
        self.group = stateless_init_torch_distributed_process_group(
            init_info.master_address, init_info.master_port, self.rank, init_info.world_size,
            backend="gloo", timeout=self.timeout,
        )
        log.warning("rayd_gloo: joined as rank %d of %d", self.rank, init_info.world_size)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self._t0 = time.perf_counter()
        self.stats = SyncStats()
        self._loaded = set()
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(): raises on CPU torch.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def receive_weights(self, info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("rayd_gloo: init_weight_transfer_engine was not called")
        t = time.perf_counter()
        dtypes = [getattr(torch, d) for d in info.dtype_names]
        plan = plan_buckets(info.dtype_names, info.shapes, info.bucket_bytes)
        partial: dict[int, tuple[torch.Tensor, int]] = {}
        shared = torch.empty(info.bucket_bytes, dtype=torch.uint8) if info.reuse_buffer else None
        pipelined = bool(int(os.environ.get("RAYD_PROTO_PIPELINE", "1"))) and shared is None

        def post(k: int) -> tuple[torch.Tensor, Any]:
            nbytes = plan[k][0]
            # A fresh buffer per bucket: vLLM's layerwise loader keeps views of it until the
            # layer's last tensor has arrived (reuse_buffer=True shows what happens otherwise).
            buf = shared[:nbytes] if shared is not None else torch.empty(nbytes, dtype=torch.uint8)
            return buf, self.group.broadcast(buf, 0, self.timeout)

        ahead = post(0) if plan else None
        for k, (nbytes, pieces) in enumerate(plan):
            buf, work = ahead if ahead is not None else post(k)
            tw = time.perf_counter()
            work.wait()
            self.stats.wire_seconds += time.perf_counter() - tw
            # The next bucket arrives (gloo's own thread) while this one loads.
            ahead = post(k + 1) if pipelined and k + 1 < len(plan) else None
            batch = []
            for i, lo, hi, off in pieces:
                n = nbytes_of(info.dtype_names[i], info.shapes[i])
                if lo == 0 and hi == n:
                    batch.append((info.names[i], buf[off : off + n].view(dtypes[i]).view(info.shapes[i])))
                    continue
                target, got = partial.get(i) or (torch.empty(info.shapes[i], dtype=dtypes[i]), 0)
                _flat_bytes(target)[lo:hi].copy_(buf[off : off + hi - lo])
                got += hi - lo
                if got == n:
                    partial.pop(i, None)
                    batch.append((info.names[i], target))
                else:
                    partial[i] = (target, got)
            if batch:
                tl = time.perf_counter()
                self._loaded.update(self.model.load_weights(batch) or ())
                self.stats.load_seconds += time.perf_counter() - tl
            self.stats.bytes += nbytes
            self.stats.buckets += 1
            self.stats.tensors += len(batch)
        if partial:
            raise RuntimeError(f"rayd_gloo: {len(partial)} tensors arrived incomplete")
        self.stats.version = info.version
        self.stats.recv_seconds += time.perf_counter() - t

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not os.environ.get("RAYD_PROTO_SKIP_FINALIZE"):
            finalize_layerwise_reload(self.model, self.model_config)
        else:
            self.stats.skip_finalize = True
        # Never raise here: an exception in finish leaves vLLM's worker "update active" and
        # every later start_weight_update refused. The missing check is read afterwards.
        expected = {name for name, _ in self.model.named_parameters()}
        self.stats.missing = sorted(expected - self._loaded)
        if not torch.cuda.is_available() and not os.environ.get("RAYD_PROTO_NO_REPACK"):
            _repack_cpu_gemm(self.model)
        self.stats.seconds = time.perf_counter() - self._t0

    def shutdown(self) -> None:
        self.group = None


def _repack_cpu_gemm(model: torch.nn.Module) -> None:
    """rayd/rollout/vllm_ext.py's repack, unchanged."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


if "rayd_gloo" not in WeightTransferEngineFactory._registry:
    WeightTransferEngineFactory.register_engine("rayd_gloo", GlooWeightTransferEngine)


class StreamExtension:
    """worker_extension_cls: what rayd reads after a sync (names must not clash with Worker's)."""

    def rayd_stream_report(self) -> dict[str, Any]:
        engine = self.weight_transfer_engine  # type: ignore[attr-defined]
        s = engine.stats
        return {
            "rank": engine.rank, "version": s.version, "bytes": s.bytes, "buckets": s.buckets,
            "tensors": s.tensors, "seconds": s.seconds, "recv_seconds": s.recv_seconds,
            "wire_seconds": s.wire_seconds, "load_seconds": s.load_seconds,
            "missing": s.missing, "skip_finalize": s.skip_finalize,
        }

    def rayd_abort_stream(self) -> None:
        """End a session a broken sync left half-way: vLLM's worker already cleared its
        "active" flag, but the layers that had started loading are still in layerwise state
        (meta tensors, buffered loads), and initialize_layerwise_reload skips such layers."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        engine = self.weight_transfer_engine  # type: ignore[attr-defined]
        finalize_layerwise_reload(engine.model, engine.model_config)
        engine.shutdown()
