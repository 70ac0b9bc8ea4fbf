"""The driver's handle on the learners: one placement group, one actor per rank, deadlines.

Every method calls all ranks together (the DeepSpeed engine is collective) and waits through
`rayd.cluster.get`, so a rank that hangs in a collective becomes a `RemoteCallTimeout` naming the
call instead of a driver that waits forever. The group is not restartable rank by rank: after a
failure, shut it down and build a new one from the last checkpoint (one rank of a collective
cannot rejoin alone; Ray Train, verl and OpenRLHF restart the whole group the same way).
"""

from __future__ import annotations

from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayd import cluster
from rayd.learner.spec import LearnerSpec
from rayd.learner.worker import LearnerWorker
from rayd.sampling import RolloutRequest
from rayd.types import Sample, TrainBatch


class LearnerFailure(RuntimeError):
    """A learner rank died: the group must be rebuilt from the last checkpoint."""


@ray.remote
def _node_address() -> tuple[str, int]:
    """IP of the node this runs on and a port free there: the rendezvous of rank 0."""
    return ray.util.get_node_ip_address(), cluster.free_port()


class LearnerGroup:
    """`spec.num_learners` `LearnerWorker` actors forming one torch.distributed group."""

    def __init__(self, spec: LearnerSpec) -> None:
        if spec.num_learners < 1:
            raise ValueError(f"num_learners must be >= 1, got {spec.num_learners}")
        self.spec = spec
        self.num_learners = num_learners = spec.num_learners
        self.timeout_s = call_timeout_s = spec.call_timeout_s
        self._actors: list[Any] = []
        self._pg: PlacementGroup | None = None
        cpus_per_learner, gpus_per_learner = spec.cpus_per_learner, spec.gpus_per_learner

        bundle: dict[str, float] = {"CPU": cpus_per_learner}
        if gpus_per_learner:
            bundle["GPU"] = gpus_per_learner
        # PACK: ranks on as few nodes as possible, so collectives stay on the fastest links.
        self._pg = placement_group([dict(bundle) for _ in range(num_learners)], strategy="PACK")
        try:
            self._collect(
                self._pg.ready(), call_timeout_s, f"placement group {bundle} x {num_learners}"
            )
            # Rank 0's address must be known before any rank starts (all block in
            # init_distributed until everyone joins): ask a task placed in rank 0's bundle.
            master_addr, master_port = self._collect(
                _node_address.options(
                    num_cpus=cpus_per_learner, scheduling_strategy=self._strategy(0)
                ).remote(),
                call_timeout_s,
                "learner rendezvous address",
            )
            remote_cls = ray.remote(LearnerWorker)
            self._actors = [
                remote_cls.options(
                    num_cpus=cpus_per_learner,
                    num_gpus=gpus_per_learner,
                    scheduling_strategy=self._strategy(rank),
                ).remote(rank, num_learners, master_addr, master_port, spec)
                for rank in range(num_learners)
            ]
            self._collect(
                cluster.call_all(self._actors, "ready"), call_timeout_s, "learner start-up"
            )
        except BaseException:
            self.shutdown()
            raise

    def _strategy(self, bundle_index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self._pg,
            placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=False,
        )

    # ---------------------------------------------------------------------------------------

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on `batch`; rank 0's metrics (all-reduced, so global)."""
        return self.finish_train_step(self.start_train_step(batch))

    def start_train_step(self, batch: TrainBatch) -> tuple[list[ray.ObjectRef], float]:
        """Starts the step and returns at once (the driver rolls out meanwhile); pass the refs
        to `finish_train_step`, which waits with the usual deadline."""
        shards, pad_fraction = self.spec.shards(batch)
        # The loss is normalised by the token count of the whole batch, not of each shard.
        global_tokens = batch.num_tokens
        refs = [
            actor.train_step.remote(shard, global_tokens)
            for actor, shard in zip(self._actors, shards, strict=True)
        ]
        return refs, pad_fraction

    def finish_train_step(self, running: tuple[list[ray.ObjectRef], float]) -> dict[str, float]:
        refs, pad_fraction = running
        metrics = self._collect(refs, self.timeout_s, "learner train_step")[0]
        metrics["learner/pad_fraction"] = pad_fraction
        return metrics

    def roll_out_and_train(
        self, request: RolloutRequest, *, pad_id: int, drop_truncated: bool
    ) -> tuple[list[list[Sample]], dict[str, float]]:
        """One synchronous step of rollout.backend=learner in one round of calls: each rank
        samples the share of the prompts `sampling_pool` would give it, and all train on the
        step's batch (`LearnerWorker.roll_out_and_train`). Each rank's samples, in rank order,
        and rank 0's metrics."""
        bounds = cluster.chunk_bounds(len(request), self.num_learners)
        refs = [
            actor.roll_out_and_train.remote(
                request.part(lo, hi), pad_id=pad_id, drop_truncated=drop_truncated
            )
            for actor, lo, hi in zip(self._actors, bounds, bounds[1:], strict=False)
        ]
        results = self._collect(refs, self.timeout_s, "learner roll_out_and_train")
        return [samples for samples, _ in results], results[0][1]

    def sampling_pool(self) -> cluster.WorkerPool:
        """The ranks as the run's rollout pool (rollout.backend=learner): each samples a
        contiguous share of the prompts with its live weights. A rank that dies is not
        restored in place; the group is rebuilt (LearnerFailure), as after a train_step."""
        return cluster.WorkerPool(
            list(self._actors), "learner", self.timeout_s, max_reissues=0, lost=LearnerFailure
        )

    def publish_weights(self) -> ray.ObjectRef:
        """Reference to the current weights as a safetensors blob, owned by rank 0.

        Every rank joins the gather (ZeRO-3 shards each parameter). The driver only passes the
        reference on to rollout workers; it never fetches the bytes.
        """
        results = self._collect(
            cluster.call_all(self._actors, "publish_weights"), self.timeout_s, "publish weights"
        )
        return results[0][0]

    def publish_teacher_weights(self) -> ray.ObjectRef:
        """Reference to the self-teacher's weights (models.teacher: self, weights live or ema),
        owned by rank 0, for the teacher actors; every rank joins (a live teacher's gather)."""
        results = self._collect(
            cluster.call_all(self._actors, "publish_teacher_weights"),
            self.timeout_s,
            "publish teacher weights",
        )
        return results[0][0]

    # --- The weight stream (sync.method=stream; rayd.weight_sync.WeightStream drives it) ---

    def weight_stream_address(self) -> tuple[str, int]:
        """Where the stream group meets: rank 0's node address and a port free there."""
        ref = self._actors[0].weight_stream_address.remote()
        return self._collect(ref, self.timeout_s, "weight stream address")

    def weight_metadata(self) -> tuple[list[str], list[str], list[list[int]]]:
        ref = self._actors[0].weight_metadata.remote()
        return self._collect(ref, self.timeout_s, "weight metadata")

    def open_weight_stream(
        self, address: str, port: int, world: int, timeout_s: float
    ) -> list[Any]:
        """Started, not waited for: rank 0 blocks until every engine has joined too."""
        return cluster.call_all(
            self._actors[:1], "open_weight_stream", address, port, world, timeout_s
        )

    def stream_weights(self, bucket_bytes: int, timeout_s: float) -> list[Any]:
        """Started, not waited for (the engines receive meanwhile); `wait_stream` collects."""
        return cluster.call_all(self._actors, "stream_weights", bucket_bytes, timeout_s)

    def wait_stream(self, refs: list[Any], timeout_s: float, what: str) -> dict[str, float]:
        return self._collect(refs, timeout_s, what)[0]

    def close_weight_stream(self) -> None:
        self._collect(
            cluster.call_all(self._actors[:1], "close_weight_stream"),
            self.timeout_s,
            "close weight stream",
        )

    def adapter_blob(self) -> bytes:
        """A LoRA student's adapters (safetensors bytes, a few MB at most: they come here)."""
        results = self._collect(
            cluster.call_all(self._actors, "adapter_blob"), self.timeout_s, "adapter weights"
        )
        return results[0]

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Teacher-forced log-probs of the targets [B, L-1] under the current weights.

        Every rank evaluates the whole batch (ZeRO-3 needs all ranks in every forward); this is
        for tests and weight-sync proofs, not a hot path.
        """
        ref = ray.put(batch)
        return self._collect(
            cluster.call_all(self._actors, "logprobs", ref), self.timeout_s, "logprobs"
        )[0]

    def teacher_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """The in-learner teacher's log-probs of the targets [B, L-1] (teacher.support=full),
        from rank 0 alone: the teacher is a plain replicated model, no collective; a live
        self-teacher under ZeRO-3 is the sharded student, so every rank joins its forward."""
        spec = self.spec
        if spec.self_teacher == "live" and spec.zero_stage == 3:
            refs = cluster.call_all(self._actors, "teacher_logprobs", ray.put(batch))
        else:
            refs = [self._actors[0].teacher_logprobs.remote(batch)]
        return self._collect(refs, self.timeout_s, "teacher log-probs")[0]

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        self._collect(
            cluster.call_all(self._actors, "save_checkpoint", directory, tag, client_state),
            self.timeout_s,
            f"save checkpoint {tag}",
        )

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        """Restore every rank; rank 0's client_state. Raises if any rank finds nothing."""
        states = self._collect(
            cluster.call_all(self._actors, "load_checkpoint", directory, tag),
            self.timeout_s,
            f"load checkpoint {tag}",
        )
        return states[0]

    def _collect(self, refs: Any, timeout_s: float, what: str) -> Any:
        """Results of a call on the ranks; a dead rank becomes LearnerFailure, whichever rank's
        error (the dead one's, or a peer's broken collective) arrives first."""
        try:
            return cluster.get(refs, timeout_s, what)
        except ray.exceptions.RayActorError as exc:
            raise LearnerFailure(f"{what}: a learner died ({exc.__class__.__name__})") from exc
        except ray.exceptions.RayTaskError as exc:
            dead = self._dead_ranks()
            if dead:
                raise LearnerFailure(
                    f"{what}: learner rank(s) {dead} died; the others failed with "
                    f"{exc.__class__.__name__}"
                ) from exc
            raise

    def _dead_ranks(self) -> list[int]:
        dead = []
        for rank, actor in enumerate(self._actors):
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(rank)
        return dead

    def shutdown(self) -> None:
        """Kill the actors and free their placement group (safe to call twice)."""
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def __enter__(self) -> LearnerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
