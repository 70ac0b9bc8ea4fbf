"""Ray plumbing: connecting, deadlines on remote calls, and a small group of identical actors.

Every remote call the driver waits on goes through `get`, which has a deadline: a hung engine
becomes a clear `TimeoutError` naming the call, never a driver that waits forever.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import ray


class RemoteCallTimeout(TimeoutError):
    pass


def get(refs: Any, timeout_s: float, what: str) -> Any:
    """`ray.get` with a deadline; the error names the call that missed it."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RemoteCallTimeout(f"{what} did not finish within {timeout_s:.0f}s") from exc


def connect(num_cpus: int | None = None) -> None:
    """Join the cluster this process runs in (`ray job submit`, RAY_ADDRESS) or start a local one.

    A local Ray counts logical CPUs: on a 2-core machine we ask for more so rollout, teacher and
    learner actors (each pinned to one or two torch threads) can coexist.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") or _inside_ray_job():
        ray.init(address="auto", log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), log_to_driver=True)


def _inside_ray_job() -> bool:
    return "RAY_JOB_ID" in os.environ or "RAY_JOB_SUBMISSION_ID" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def call_all(actors: Sequence[Any], method: str, *args: Any, **kwargs: Any) -> list[Any]:
    """Start `method` on every actor with the same arguments; returns the object refs."""
    return [getattr(actor, method).remote(*args, **kwargs) for actor in actors]


class WorkerPool:
    """Identical actors that share work: inputs are split into contiguous, near-equal chunks."""

    def __init__(self, actors: list[Any], name: str, timeout_s: float) -> None:
        self.actors, self.name, self.timeout_s = actors, name, timeout_s

    def __len__(self) -> int:
        return len(self.actors)

    def map_chunks(self, method: str, *inputs: list[Any], **kwargs: Any) -> list[Any]:
        """Call `method(chunk_of_each_input..., **kwargs)` on each actor; concatenate in order."""
        total = len(inputs[0])
        bounds = [round(i * total / len(self.actors)) for i in range(len(self.actors) + 1)]
        refs = []
        for actor, lo, hi in zip(self.actors, bounds, bounds[1:], strict=False):
            if hi > lo:
                chunks = [items[lo:hi] for items in inputs]
                refs.append(getattr(actor, method).remote(*chunks, **kwargs))
        results = get(refs, self.timeout_s, f"{self.name}.{method}")
        return [item for chunk in results for item in chunk]

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        refs = call_all(self.actors, method, *args, **kwargs)
        return get(refs, self.timeout_s, f"{self.name}.{method}")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
