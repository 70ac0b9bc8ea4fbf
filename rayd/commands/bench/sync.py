"""Weight sync: the object-store blob against the streamed path, side by side in one run.

Per model size (random-initialised Llama configs, fp32, the character vocabulary), one sender
actor stands in for learner rank 0 of a ZeRO-0/1/2 learner, holding the whole model, and one or
two real vLLM (CPU) rollout engines receive. Each sync is run as a run does it:
- blob (sync.method=blob): the sender serialises the state dict (`rayd.weight_sync`) and puts
  it in the object store; every engine fetches it and runs `load_weights` (the driver's
  `Run.sync_weights`);
- stream (sync.method=stream): `rayd.weight_sync.WeightStream`, the driver's own control plane,
  drives the sender's `send_buckets` (gloo, sync.bucket_mib) and every engine's vLLM
  weight-transfer session (`rayd.rollout.weight_stream`).
The two alternate, after a warm-up sync of each; the figures are medians. Per sync:
- seconds at the driver, from the first call to the last engine's answer;
- payload: the bytes that leave the sender (the blob's size; the buckets' bytes);
- extra memory: each process's peak resident memory during the sync minus its resident memory
  just before (Linux's VmHWM, reset through /proc/PID/clear_refs), for the sender and for each
  engine (its Ray actor and every process under it: vLLM's engine core and workers);
- the limit: one copy of the model's bytes per receiving engine at the memcpy bandwidth
  measured in this run (torch `copy_` of 256 MiB), and each path's seconds over it;
- the transport alone: a bare gloo broadcast between as many local processes, at the model's
  size (what a shared-memory transport would have to beat).
Learners under ZeRO-3 gather one tensor at a time on top of this (tests/ray/test_weight_stream.py
checks they send the same bytes); the sender here holds the whole model, as ZeRO-0/1/2 do.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import ray
import torch

from rayd.cluster import WorkerPool, get
from rayd.commands.bench.scaling import Publisher

TIMEOUT_S = 900
BUCKET_MIB = 512.0  # sync.bucket_mib's default
# name -> (layers, hidden, heads, engines): head_dim 64; 16 * hidden^2 parameters per layer.
# The one-engine size is the largest at which both paths fit in this machine's 23.5 GiB: the
# blob path holds about six copies of the model at its peak (docs/experiments/performance.md).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "0.1b": (12, 768, 12, 2),
    "0.5b": (19, 1280, 20, 2),
    "0.8b": (12, 2048, 32, 1),
}
QUICK_SIZES: dict[str, tuple[int, int, int, int]] = {"10m": (8, 256, 4, 2)}


class Sender(Publisher):
    """Learner rank 0's side of both paths, holding the whole fp32 model: the blob as the
    scaling section's publisher, the stream as `rayd.learner.worker.LearnerWorker`'s calls, over
    `rayd.rollout.weight_stream`'s sender."""

    def __init__(self, model_path: str) -> None:
        super().__init__(model_path)
        self.group: Any = None

    def pid(self) -> int:
        return os.getpid()

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        seen: set[int] = set()
        out = []
        for name, tensor in self.model.state_dict().items():
            if tensor.data_ptr() not in seen:  # tied weights once, as the learners send them
                seen.add(tensor.data_ptr())
                out.append((name, tensor))
        return out

    def weight_stream_address(self) -> tuple[str, int]:
        from rayd.cluster import free_port

        return ray.util.get_node_ip_address(), free_port()

    def weight_metadata(self) -> tuple[list[str], list[str], list[list[int]]]:
        tensors = self._tensors()
        return (
            [name for name, _ in tensors],
            [str(t.dtype).removeprefix("torch.") for _, t in tensors],
            [list(t.shape) for _, t in tensors],
        )

    def open_weight_stream(
        self, address: str, port: int, world_size: int, timeout_s: float
    ) -> None:
        from rayd.rollout.weight_stream import join_group

        self.group = join_group(address, port, 0, world_size, timeout_s)

    def stream_weights(self, bucket_bytes: int, timeout_s: float) -> dict[str, float]:
        from rayd.rollout.weight_stream import send_buckets

        _, dtypes, shapes = self.weight_metadata()
        tensors = (t for _, t in self._tensors())
        sent, buckets = send_buckets(self.group, tensors, dtypes, shapes, bucket_bytes, timeout_s)
        return {"bytes": sent, "buckets": buckets}

    def close_weight_stream(self) -> None:
        from rayd.rollout.weight_stream import drop_group

        drop_group(self.group)
        self.group = None


class SenderGroup:
    """The one sender as `rayd.learner.group.LearnerGroup`'s weight-stream surface, the part
    `WeightStream` calls."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def weight_stream_address(self) -> tuple[str, int]:
        return get(self.actor.weight_stream_address.remote(), TIMEOUT_S, "address")

    def weight_metadata(self) -> tuple[list[str], list[str], list[list[int]]]:
        return get(self.actor.weight_metadata.remote(), TIMEOUT_S, "metadata")

    def open_weight_stream(self, address: str, port: int, world: int, timeout: float) -> list:
        return [self.actor.open_weight_stream.remote(address, port, world, timeout)]

    def stream_weights(self, bucket_bytes: int, timeout_s: float) -> list[Any]:
        return [self.actor.stream_weights.remote(bucket_bytes, timeout_s)]

    def wait_stream(self, refs: list[Any], timeout_s: float, what: str) -> dict[str, float]:
        return get(refs, timeout_s, what)[0]

    def close_weight_stream(self) -> None:
        get(self.actor.close_weight_stream.remote(), TIMEOUT_S, "close")


class PeakMemory:
    """Peak resident memory of a few processes over a stretch of time, from Linux's VmHWM."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids  # role -> its processes
        self.before: dict[int, int] = {}

    @staticmethod
    def _status_kib(pid: int, key: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/{pid}/status has no {key}")

    def start(self) -> None:
        for pids in self.pids.values():
            for pid in pids:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
                self.before[pid] = self._status_kib(pid, "VmRSS")

    def extra_mib(self) -> dict[str, float]:
        """Role -> the sum over its processes of (peak - resident at start), MiB."""
        return {
            role: sum(self._status_kib(p, "VmHWM") - self.before[p] for p in pids) / 1024
            for role, pids in self.pids.items()
        }


def memcpy_gb_per_s() -> float:
    """torch `copy_` between two 256 MiB buffers, the best of five (one thread, as the engines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.ones(2**28, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch the pages
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return src.numel() / best / 1e9
    finally:
        torch.set_num_threads(threads)


class Peer:
    """A bare member of a gloo group: the transport alone, without packing or loading."""

    def join(self, address: str, port: int, rank: int, world: int) -> None:
        from rayd.rollout.weight_stream import join_group

        torch.set_num_threads(1)
        self.group = join_group(address, port, rank, world, TIMEOUT_S)

    def broadcast(self, nbytes: int, times: int) -> float:
        """Seconds for `times` broadcasts of `nbytes` from rank 0, into one buffer."""
        from datetime import timedelta

        buffer = torch.ones(nbytes, dtype=torch.uint8)
        start = time.perf_counter()
        for _ in range(times):
            self.group.broadcast(buffer, 0, timedelta(seconds=TIMEOUT_S)).wait()
        return time.perf_counter() - start


def gloo_gb_per_s(receivers: int, nbytes: int = 2**29, times: int = 4) -> float:
    """Bytes a gloo broadcast from one local process delivers to each of `receivers` others,
    per second (what the stream's transport alone can do here)."""
    from rayd.cluster import free_port

    peers = [ray.remote(Peer).options(num_cpus=0).remote() for _ in range(receivers + 1)]
    try:
        port, world = free_port(), receivers + 1
        address = ray.util.get_node_ip_address()
        get([p.join.remote(address, port, r, world) for r, p in enumerate(peers)], 120, "join")
        get([p.broadcast.remote(nbytes, 1) for p in peers], 120, "warm-up")
        seconds = get([p.broadcast.remote(nbytes, times) for p in peers], TIMEOUT_S, "bcast")
        return nbytes * times / max(seconds) / 1e9
    finally:
        for peer in peers:
            ray.kill(peer)


def _engine_pids(actor: Any) -> list[int]:
    """The engine actor's process and every process under it (vLLM's engine core, workers)."""

    def tree(_: Any) -> list[int]:
        import psutil

        me = psutil.Process()
        return [me.pid, *(c.pid for c in me.children(recursive=True))]

    return get(actor.__ray_call__.remote(tree), 60, "engine processes")


def one_size(path: str, engines: int, reps: int) -> dict[str, Any]:
    from rayd.commands.bench.scaling import _rollout_engines
    from rayd.config import SyncConfig
    from rayd.weight_sync import WeightStream

    sender = ray.remote(Sender).options(num_cpus=0).remote(path)
    actors, pg = _rollout_engines(path, engines)
    try:
        pool = WorkerPool(actors, "rollout", TIMEOUT_S, max_reissues=0)
        stream = WeightStream(
            SenderGroup(sender), pool, SyncConfig(bucket_mib=BUCKET_MIB), [1] * engines
        )
        pids = {"sender": [get(sender.pid.remote(), 60, "pid")]}
        pids.update({f"engine_{i}": _engine_pids(a) for i, a in enumerate(actors)})
        memory = PeakMemory(pids)
        version = 0

        def blob() -> int:
            ref_box, size = get(sender.publish.remote(), TIMEOUT_S, "publish")
            pool.call_all("load_weights", ref_box[0], version)
            del ref_box
            return size

        def streamed() -> int:
            stream.sync(version)
            return int(stream.last["sync/bytes"])

        runs: dict[str, dict[str, list[float]]] = {
            "blob": {"seconds": [], "payload": []},
            "stream": {"seconds": [], "payload": []},
        }
        extra: dict[str, list[dict[str, float]]] = {"blob": [], "stream": []}
        for rep in range(reps + 1):  # rep 0 is a warm-up of each (and forms the group)
            for method, call in (("blob", blob), ("stream", streamed)):
                version += 1
                memory.start()
                start = time.perf_counter()
                payload = call()
                seconds = time.perf_counter() - start
                if rep:
                    runs[method]["seconds"].append(seconds)
                    runs[method]["payload"].append(payload)
                    extra[method].append(memory.extra_mib())
        assert pool.call_all("weight_version") == [version] * engines
        stream.close()
        buckets = int(stream.last.get("sync/buckets", 0))
    finally:
        for actor in (*actors, sender):
            ray.kill(actor)
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
    out: dict[str, Any] = {"engines": engines, "buckets": buckets}
    for method in ("blob", "stream"):
        roles = extra[method][0].keys()
        out[method] = {
            "seconds": statistics.median(runs[method]["seconds"]),
            "payload_mib": statistics.median(runs[method]["payload"]) / 2**20,
            "extra_mib": {r: statistics.median(e[r] for e in extra[method]) for r in roles},
        }
    return out


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from rayd.commands.bench import local_ray
    from rayd.models import build_tiny_llama, count_params

    sizes = QUICK_SIZES if quick else SIZES
    reps = 2 if quick else 3
    bandwidth = memcpy_gb_per_s()
    out: dict[str, Any] = {"memcpy_gb_per_s": bandwidth, "bucket_mib": BUCKET_MIB}
    gloo: dict[int, float] = {}  # receivers -> GB/s each receives
    for name, (layers, hidden, heads, engines) in sizes.items():
        path = workdir / name
        build_tiny_llama(path, layers=layers, hidden=hidden, heads=heads)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        params = count_params(model)
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        del model
        with local_ray():
            figures = one_size(str(path), engines, reps)
            if engines not in gloo:
                gloo[engines] = gloo_gb_per_s(engines)
        limit_s = model_bytes * engines / (bandwidth * 1e9)
        blob, stream = figures["blob"], figures["stream"]
        out[name] = {
            "params": params,
            "model_mib": model_bytes / 2**20,
            **figures,
            "limit_s": limit_s,
            "gloo_alone_s": model_bytes / (gloo[engines] * 1e9),
            "blob_over_limit": blob["seconds"] / limit_s,
            "stream_over_limit": stream["seconds"] / limit_s,
            "stream_over_blob_time": stream["seconds"] / blob["seconds"],
            "stream_sender_extra_over_bucket": stream["extra_mib"]["sender"] / BUCKET_MIB,
        }
    out.update({f"gloo_gb_per_s_to_{n}": v for n, v in gloo.items()})
    out["notes"] = [
        "one sender actor (learner rank 0 of a ZeRO-0/1/2 learner, the whole model) and real "
        "vLLM CPU engines (one CPU, one thread each); blob = object store + load_weights, "
        "stream = rayd.weight_sync.WeightStream over gloo in sync.bucket_mib buckets; medians "
        "of alternating syncs after a warm-up of each",
        "extra_mib: peak resident memory during the sync minus resident memory just before, "
        "per role (an engine = its actor and the vLLM processes under it)",
        "limit_s: the model's bytes once per engine at memcpy_gb_per_s (torch copy_, one "
        "thread, this run); *_over_limit = that path's seconds / limit_s",
        "gloo_gb_per_s_to_N: what each of N local processes receives per second from one gloo "
        "broadcast (512 MiB buffers, bare processes); gloo_alone_s: the model at that rate, "
        "the stream's transport without packing or loading",
    ]
    return out
