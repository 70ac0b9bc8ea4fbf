"""Ray plumbing: connecting, deadlines on remote calls, and a small group of identical actors.

Every remote call the driver waits on goes through `get`, which has a deadline: a hung engine
becomes a clear `TimeoutError` naming the call, never a driver that waits forever.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, TypeVar

import ray
from ray.util.placement_group import remove_placement_group

from rayd.noise import quiet_known_noise, worker_environ, worker_runtime_env
from rayd.progress import is_terminal

T = TypeVar("T")


class RemoteCallTimeout(TimeoutError):
    pass


class NeedsRestore(RuntimeError):
    """Raised by an actor that came back from a restart without the state the caller expects
    (Ray runs calls queued during a restart on the fresh actor)."""


class WorkerLost(RuntimeError):
    """An actor kept dying after Ray restarted it as many times as allowed."""


def get(refs: Any, timeout_s: float, what: str) -> Any:
    """`ray.get` with a deadline; the error names the call that missed it.

    For a list, the first call to fail raises at once: ranks of a collective whose peer died
    would otherwise keep the driver waiting until their own (long) collective timeout.
    """
    try:
        if isinstance(refs, list) and len(refs) > 1:
            deadline = time.monotonic() + timeout_s
            pending = list(refs)
            while pending:
                left = max(deadline - time.monotonic(), 0)
                done, pending = ray.wait(pending, num_returns=1, timeout=left)
                if not done:
                    raise ray.exceptions.GetTimeoutError(what)
                ray.get(done[0])
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise RemoteCallTimeout(f"{what} did not finish within {timeout_s:.0f}s") from exc


def connect(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster this process runs in (`ray job submit`, RAY_ADDRESS) or start a local one.

    A local Ray counts logical CPUs: on a 2-core machine we ask for more so rollout, teacher and
    learner actors (each pinned to one or two torch threads) can coexist.
    """
    if ray.is_initialized():
        return
    # Library warnings a user cannot act on: demoted here and, through the job's runtime env,
    # in every worker (rayd/noise.py); bars of the driver's model saves stay out of log files.
    quiet_known_noise()
    if not is_terminal(sys.stderr):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if os.environ.get("RAY_ADDRESS") or _inside_ray_job():
        runtime_env = worker_runtime_env(_submitted_runtime_env())
        ray.init(address="auto", log_to_driver=log_to_driver, runtime_env=runtime_env)
    else:
        # A local Ray's workers inherit the environment it starts in, and each rayd actor
        # quiets the known noise itself (rayd.device.prepare_process): a job runtime env would
        # do the same at a cost to a tiny run's start-up (each worker spawned through Ray's
        # runtime-env agent, none taken from the idle ones Ray starts), and so would the
        # dashboard (docs/experiments/performance.md). A local run has neither; `ray start
        # --head` and RAY_ADDRESS give a dashboard.
        # "local": without it ray.init joins a `ray start` cluster found on this machine, and
        # then refuses num_cpus (ValueError) instead of starting the local Ray promised here.
        with worker_environ():
            ray.init(
                address="local",
                num_cpus=num_cpus or max(8, os.cpu_count() or 1),
                log_to_driver=log_to_driver,
                include_dashboard=False,
            )


def _submitted_runtime_env() -> dict[str, Any]:
    """The runtime env of the `ray job submit` this driver runs in (empty outside a job)."""
    import json

    try:  # the variable Ray's job supervisor hands the job's config in (ray.init reads it)
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return {}
    return job.get("runtime_env") or {}


def _inside_ray_job() -> bool:
    return "RAY_JOB_ID" in os.environ or "RAY_JOB_SUBMISSION_ID" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def chunk_bounds(total: int, parts: int) -> list[int]:
    """Where `parts` contiguous, near-equal chunks of `total` items start, and the end: chunk i
    is items [bounds[i], bounds[i + 1]), empty when there are fewer items than parts."""
    return [round(i * total / parts) for i in range(parts + 1)]


def call_all(actors: Sequence[Any], method: str, *args: Any, **kwargs: Any) -> list[Any]:
    """Start `method` on every actor with the same arguments; returns the object refs."""
    return [getattr(actor, method).remote(*args, **kwargs) for actor in actors]


class WorkerPool:
    """Identical actors that share work: inputs are split into contiguous, near-equal chunks.

    Actors are created with Ray's `max_restarts`. When one dies mid-call, Ray brings it back in
    its *initial* state, so the pool first replays the calls registered with `remember` (for a
    rollout engine: the current weights) and then re-issues the unfinished chunk; the caller sees
    a normal result, and `faults` counts what happened. Rollouts are seeded per step, so a
    re-issued chunk returns what the first attempt would have.
    """

    def __init__(
        self,
        actors: list[Any],
        name: str,
        timeout_s: float,
        max_reissues: int = 3,
        placement_groups: Sequence[Any] = (),
        lost: type[Exception] = WorkerLost,
    ) -> None:
        """`lost`: what a dead actor becomes once it cannot be re-issued to (a learner rank
        that samples takes its whole group down: LearnerFailure)."""
        self.actors, self.name, self.timeout_s = actors, name, timeout_s
        self.lost = lost
        # Multi-device engines' reservations: released with the actors.
        self.placement_groups = list(placement_groups)
        self.max_reissues = max_reissues
        self.faults = 0
        self._replay: dict[str, Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]] = {}
        # reroute: a lost actor is not given its state back mid-call; it is `unserved` (its
        # index here), and its calls go to a serving actor until the owner serves it again
        # (a streamed weight sync: the learners may be busy, or past the engines' version).
        self.reroute = False
        self.unserved: set[int] = set()

    def __len__(self) -> int:
        return len(self.actors)

    def remember(self, method: str, *args: Any, **kwargs: Any) -> None:
        """A call that sets state a restarted actor must get again before it serves."""
        self._replay[method] = lambda: (args, kwargs)

    def remember_lazy(self, method: str, make_args: Callable[[], tuple[Any, ...]]) -> None:
        """As `remember`, with arguments made only when an actor is restored (weights built
        from the learners then, instead of a copy held between syncs)."""
        self._replay[method] = lambda: (make_args(), {})

    def map_chunks(self, method: str, *inputs: list[Any], **kwargs: Any) -> list[Any]:
        """Call `method(chunk_of_each_input..., **kwargs)` on each actor; concatenate in order."""
        chunks = dict(self.map_chunks_as_completed(method, *inputs, **kwargs))
        return [item for i in sorted(chunks) for item in chunks[i]]

    def map_chunks_as_completed(
        self, method: str, *inputs: list[Any], **kwargs: Any
    ) -> Iterator[tuple[int, list[Any]]]:
        """As `map_chunks`, but yields `(chunk_index, chunk_result)` as each actor finishes, so
        the caller can pass a chunk on (to the teacher) while the others still run. Chunk i is
        always the same contiguous slice of the inputs: sorting by index restores the order."""
        bounds = chunk_bounds(len(inputs[0]), len(self.actors))
        jobs = []
        for index, lo, hi in zip(range(len(self.actors)), bounds, bounds[1:], strict=False):
            if hi > lo:
                # An unserved actor's chunk, the same slice, goes to a serving one.
                actor = self.actors[self._serving() if index in self.unserved else index]
                jobs.append((actor, method, tuple(items[lo:hi] for items in inputs), kwargs))
        return self._as_completed(jobs)

    def _serving(self) -> int:
        """The first actor that serves (reroute); `lost` when none is left."""
        for index in range(len(self.actors)):
            if index not in self.unserved:
                return index
        raise self.lost(
            f"every {self.name} actor was lost and none can be given its state now "
            "(sync.method=stream: use sync.method=blob, or more than one engine)"
        )

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        jobs = [(actor, method, args, kwargs) for actor in self.actors]
        results = dict(self._as_completed(jobs))
        return [results[i] for i in range(len(jobs))]

    def _as_completed(
        self, jobs: list[tuple[Any, str, tuple[Any, ...], dict[str, Any]]]
    ) -> Iterator[tuple[int, Any]]:
        """`(job index, result)` of every job as it arrives; a job whose actor died is re-issued
        after a restore (and arrives later)."""

        def submit(job: tuple[Any, str, tuple[Any, ...], dict[str, Any]]) -> Any:
            actor, method, args, kwargs = job
            return getattr(actor, method).remote(*args, **kwargs)

        pending = {i: submit(job) for i, job in enumerate(jobs)}
        deadlines = dict.fromkeys(pending, time.monotonic() + self.timeout_s)
        attempts = dict.fromkeys(pending, 0)
        while pending:
            left = min(deadlines[i] for i in pending) - time.monotonic()
            done, _ = ray.wait(list(pending.values()), num_returns=1, timeout=max(left, 0))
            if not done:
                late = min(pending, key=deadlines.__getitem__)
                what = f"{self.name}.{jobs[late][1]}"
                raise RemoteCallTimeout(f"{what} did not finish within {self.timeout_s:.0f}s")
            i = next(k for k, ref in pending.items() if ref == done[0])
            try:
                result = ray.get(done[0])
            except (ray.exceptions.RayActorError, NeedsRestore) as exc:
                attempts[i] += 1
                what = f"{self.name}.{jobs[i][1]}"
                if attempts[i] > self.max_reissues:
                    raise self.lost(
                        f"{what}: the actor died {attempts[i]} times on the same call; giving up"
                    ) from exc
                self.faults += 1
                print(
                    f"rayd: {self.name} actor died during {jobs[i][1]} ({exc.__class__.__name__}); "
                    f"restoring it and re-issuing the call (fault {self.faults})",
                    file=sys.stderr,
                )
                actor = jobs[i][0]
                if self.reroute and actor in self.actors:
                    # Ray restarts it meanwhile; the owner gives it its state (`restore`).
                    self.unserved.add(self.actors.index(actor))
                    jobs[i] = (self.actors[self._serving()], *jobs[i][1:])
                else:
                    # If it died again (or cannot restart), the re-issued call will say so.
                    with contextlib.suppress(ray.exceptions.RayActorError):
                        self.restore(actor)
                pending[i] = submit(jobs[i])
                deadlines[i] = time.monotonic() + self.timeout_s
                continue
            del pending[i]
            yield i, result

    def restore(self, actor: Any, replay: bool = True) -> None:
        """Waits for Ray to restart `actor`, then replays the remembered state-setting calls
        (`replay`; otherwise its owner gives it its state)."""
        deadline = time.monotonic() + self.timeout_s
        while True:  # calls fail fast with ActorUnavailableError while Ray restarts the actor
            try:
                left = max(deadline - time.monotonic(), 1.0)
                get(actor.ready.remote(), left, f"{self.name}.ready after restart")
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise RemoteCallTimeout(
                        f"{self.name} actor did not come back within {self.timeout_s:.0f}s"
                    ) from None
                time.sleep(0.2)
        for method, make in self._replay.items() if replay else ():
            args, kwargs = make()
            get(
                getattr(actor, method).remote(*args, **kwargs),
                self.timeout_s,
                f"{self.name}.{method} replay after restart",
            )

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        for group in self.placement_groups:
            remove_placement_group(group)
        self.placement_groups = []


def side_by_side(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run blocking calls on *different* pools at once (`WorkerPool.map_chunks` blocks until its
    chunks are back), so several teacher pools score in parallel; results in order.

    One thread per call, and each pool is touched by its own thread only (its fault count and
    restore state are not shared), so the pools need no locks; Ray's driver API is thread-safe.
    Every call is waited for before the first error is raised: a pool must not keep working
    behind the driver's back while the caller shuts the actors down.
    """
    if len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="rayd-pool") as threads:
        futures = [threads.submit(call) for call in calls]
        wait_futures(futures)
    return [f.result() for f in futures]
