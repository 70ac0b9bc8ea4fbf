"""Moving student weights from the learners to the rollout engines.

Two ways (sync.method): `WeightStream` streams them in buckets over a process group, through
vLLM's weight-transfer API (vLLM engines); otherwise weights travel as one safetensors blob
placed in the Ray object store by learner rank 0, so the
driver only ever holds a reference: the cost grows with model size, not with the number of
rollout engines times model size at the driver. Every blob carries a version; a rollout tags each
sample with the version that produced it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rayd.cluster import get as cluster_get
from rayd.config import SyncConfig


def serialize_state_dict(state_dict: dict[str, torch.Tensor]) -> bytes:
    """Contiguous CPU copies, minus tensors that alias another one (tied embeddings)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        ptr = tensor.data_ptr()
        if ptr in seen:  # safetensors refuses shared storage; the receiver re-ties on load
            continue
        seen.add(ptr)
        out[name] = tensor.detach().to("cpu").contiguous()
    return st_save(out)


def deserialize_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    return st_load(blob)


def load_whole_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> str | None:
    """Load a full state dict into a model of the same architecture; returns what did not fit
    (None when all did). A tied LM head may be absent: serialize_state_dict drops it, and it
    follows the embedding, re-tied here."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = sorted(set(missing) - ({"lm_head.weight"} if tied else set()))
    if tied:
        model.tie_weights()
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {sorted(unexpected)[:3]}"
    return None


class WeightStream:
    """sync.method=stream, the driver's side: it forms the group, starts each sync on the
    learners and every engine together, and recovers from a lost engine. The bytes go from
    learner rank 0 straight to the engines (rayd.rollout.weight_stream); the driver holds no
    weights and no reference to any.

    The group is learner rank 0 (rank 0, on its node's address and a port free there) and
    every rank of every engine, in pool order. A gloo group cannot take a member back, so after
    a fault it is formed anew at the next sync.
    """

    def __init__(
        self, learners: Any, rollout: Any, cfg: SyncConfig, engine_ranks: list[int]
    ) -> None:
        """`engine_ranks`: each engine's ranks (tensor x pipeline parallel), in pool order."""
        self.learners, self.rollout, self.cfg = learners, rollout, cfg
        self.engine_ranks = engine_ranks
        self.metadata: tuple[list[str], list[str], list[list[int]]] | None = None
        self.formed_at_faults: int | None = None  # the pool's fault count when the group formed
        self.last: dict[str, float] = {}

    def sync(self, version: int) -> None:
        if self.metadata is None:  # the shapes do not change between syncs
            self.metadata = self.learners.weight_metadata()
        if self.formed_at_faults != self.rollout.faults:  # first sync, or an engine restarted
            self._form_group()
        names, dtypes, shapes = self.metadata
        update = {
            "names": names,
            "dtype_names": dtypes,
            "shapes": shapes,
            "bucket_bytes": self.cfg.bucket_bytes,
            "version": version,
        }
        start = time.perf_counter()
        sender = self.learners.stream_weights(update["bucket_bytes"], self.cfg.timeout_s)
        receivers = [a.receive_weights.remote(update, version) for a in self.rollout.actors]
        failed, sent = self._wait(sender, receivers, "streamed weight sync")
        if failed:
            self._recover(version, failed)
            return
        self.rollout.unserved.clear()  # engines restored mid-rollout hold `version` now too
        seconds = time.perf_counter() - start
        reports = cluster_get(receivers, self.cfg.timeout_s, "engine reports")  # all in by now
        self.last = {
            "sync/bytes": float(sent["bytes"]),
            "sync/buckets": float(sent["buckets"]),
            "sync/seconds": seconds,
            # The slowest engine rank, from its first receive to its last layer loaded.
            "sync/engine_seconds": max(float(r["seconds"]) for e in reports for r in e),
        }

    def _form_group(self) -> None:
        for i in sorted(self.rollout.unserved):  # lost mid-rollout: back before they can join
            self.rollout.restore(self.rollout.actors[i], replay=False)
        address, port = self.learners.weight_stream_address()
        offsets = [1 + sum(self.engine_ranks[:i]) for i in range(len(self.engine_ranks))]
        world = 1 + sum(self.engine_ranks)
        sender = self.learners.open_weight_stream(address, port, world, self.cfg.timeout_s)
        receivers = [
            actor.join_weight_stream.remote(
                {
                    "master_address": address,
                    "master_port": port,
                    "rank_offset": offsets[i],
                    "world_size": world,
                    "timeout_s": self.cfg.timeout_s,
                }
            )
            for i, actor in enumerate(self.rollout.actors)
        ]
        failed, _ = self._wait(sender, receivers, "weight stream start-up")
        if failed:  # an engine died before it joined: restore it; the next sync tries again
            self.learners.close_weight_stream()
            self._restore(failed)
            self.formed_at_faults = None
            raise RuntimeError(
                f"the weight stream could not start: rollout engine(s) {failed} died while "
                "joining it"
            )
        self.formed_at_faults = self.rollout.faults
        print(
            f"rayd: weights stream from learner rank 0 ({address}:{port}) to "
            f"{len(self.rollout.actors)} engine(s), {world - 1} rank(s), over gloo in "
            f"{self.cfg.bucket_mib} MiB buckets",
            file=sys.stderr,
        )

    def _wait(
        self, sender: list[Any], receivers: list[Any], what: str
    ) -> tuple[list[int], dict[str, float]]:
        """Waits for every call; returns the engines that died and the sender's answer. A
        learner that died is a LearnerFailure (the run is rebuilt from its checkpoint); a call
        still running at the deadline, or an engine that failed without dying, ends the run in
        one line."""
        import ray

        # The group's own timeout (the same) fires first, and names the broken peer.
        deadline = time.monotonic() + self.cfg.timeout_s * 1.1 + 5
        pending = list(sender) + list(receivers)
        ray.wait(pending, num_returns=len(pending), timeout=max(deadline - time.monotonic(), 0))
        late = [i for i, ref in enumerate(receivers) if not ray.wait([ref], timeout=0)[0]]
        if late:
            raise RuntimeError(
                f"{what}: rollout engine(s) {late} did not finish within sync.timeout_s="
                f"{self.cfg.timeout_s:.0f}s (stalled?)"
            )
        failed, errors = [], []
        for i, ref in enumerate(receivers):
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                failed.append(i)
            except ray.exceptions.RayTaskError as exc:
                errors.append((i, exc))
        sent: dict[str, float] = {}
        try:
            sent = self.learners.wait_stream(sender, 1.0, what) or {}
        except Exception:
            if not failed:  # a learner's own failure (or a lost one: LearnerFailure)
                raise
        if errors and not failed:
            i, exc = errors[0]
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise RuntimeError(f"{what}: rollout engine {i}: {cause}") from None
        return failed, sent

    def _recover(self, version: int, dead: list[int]) -> None:
        """Engines died mid-sync. Ray restarts them; single-rank survivors leave the group
        (their weights are a mix); both load `version` from one blob built now from the
        learners. A multi-rank survivor is restarted too: after one rank's call failed, vLLM's
        multiprocess executor hands later calls the answers of earlier ones (measured, TP=2).
        The group forms anew at the next sync."""
        import ray

        self.learners.close_weight_stream()
        actors = self.rollout.actors
        restart = [i for i in range(len(actors)) if i not in dead and self.engine_ranks[i] > 1]
        alive = [i for i in range(len(actors)) if i not in dead and i not in restart]
        cluster_get(
            [actors[i].leave_weight_stream.remote() for i in alive], self.cfg.timeout_s, "leave"
        )
        for i in restart:
            ray.kill(actors[i], no_restart=False)
        self._restore(sorted(dead + restart))
        blob = self.learners.publish_weights()
        cluster_get(
            [actors[i].load_weights.remote(blob, version) for i in range(len(actors))],
            self.cfg.timeout_s,
            "weights to the engines of a broken stream",
        )
        del blob
        self.rollout.unserved.clear()
        self.formed_at_faults = None
        self.last = {}

    def _restore(self, dead: list[int]) -> None:
        """Waits for Ray to restart each; the caller gives them their weights."""
        for i in dead:
            self.rollout.faults += 1
            print(
                f"rayd: rollout engine {i} was lost in a streamed weight sync; restoring it "
                f"(fault {self.rollout.faults})",
                file=sys.stderr,
            )
            self.rollout.restore(self.rollout.actors[i], replay=False)
            self.rollout.unserved.add(i)

    def close(self) -> None:
        """Drop rank 0's group (the engines' go with their actors)."""
        if self.formed_at_faults is not None:
            self.learners.close_weight_stream()
            self.formed_at_faults = None
