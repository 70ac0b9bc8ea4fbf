"""The learner process: environment, torch.distributed, and one `DeepSpeedLearner`.

A plain class: `LearnerGroup` wraps it with `ray.remote` and spawns one per rank; a test can also
build it in-process (world_size=1). The constructor blocks in `init_distributed` until all
`world_size` ranks have joined, so the group constructs all of them concurrently.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from typing import Any

import torch

from rayd import device as devices
from rayd.learner.spec import LearnerSpec
from rayd.rollout.hf_engine import HFEngine
from rayd.rollout.worker import RolloutWorker
from rayd.sampling import RolloutRequest
from rayd.types import Sample, TeacherScore, TrainBatch, training_batch
from rayd.weight_sync import serialize_state_dict


class LearnerWorker:
    """One rank of the learner group (a Ray actor when spawned by `LearnerGroup`)."""

    def __init__(
        self, rank: int, world_size: int, master_addr: str, master_port: int, spec: LearnerSpec
    ) -> None:
        self.rank, self.world_size, self.spec = rank, world_size, spec
        self.device = devices.detect()
        # Before DeepSpeed is imported: it reads DS_ACCELERATOR once, at import.
        devices.prepare_process(self.device, spec.threads)
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            # Ray gives each learner actor only its own GPU (CUDA_VISIBLE_DEVICES), so the
            # device this process sees is always index 0, whatever its global rank.
            LOCAL_RANK="0",
        )
        if self.device.is_gpu:
            torch.cuda.set_device(0)

        import deepspeed

        from rayd.learner.deepspeed_backend import DeepSpeedLearner

        # On a CPU, DeepSpeed prints "DeepSpeed ...shm_comm_op built successfully" here, once
        # per rank and run: nothing a user can act on (a failed build raises, and stays visible).
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend=self.device.dist_backend)
        self.learner = DeepSpeedLearner(spec)
        # rollout.backend=learner: this rank also samples, from the very module it trains
        # (no copy, no sync); its weight version is the number of steps it has taken.
        self.sampler: RolloutWorker | None = None
        if spec.rollout is not None:
            engine = HFEngine(spec.rollout, model=self.learner.engine.module)
            self.sampler = RolloutWorker(spec.rollout, engine=engine)
        self._stream: Any = None  # rank 0's weight-stream group (sync.method=stream)

    def ready(self) -> dict[str, Any]:
        """Returns once the constructor (and so the process group) is complete."""
        return {"rank": self.rank, "device": self.device.kind, "pid": os.getpid()}

    def train_step(self, shard: TrainBatch, global_tokens: int) -> dict[str, float]:
        metrics = self.learner.train_step(shard, global_tokens)
        if self.sampler is not None:
            self.sampler.weights_changed(self.sampler.weight_version() + 1)
        return metrics

    def generate(self, *args: Any, **kwargs: Any) -> list[Sample]:
        """`RolloutWorker.generate` on this rank's live weights (rollout.backend=learner)."""
        if self.sampler is None:
            raise RuntimeError("this learner does not sample (rollout.backend is not learner)")
        return self.sampler.generate(*args, **kwargs)

    def roll_out_and_train(
        self, request: RolloutRequest, *, pad_id: int, drop_truncated: bool
    ) -> tuple[list[Sample], dict[str, float]]:
        """`generate` on this rank's share of a step's prompts (`request`), then `train_step`
        on the step's batch: a synchronous step of rollout.backend=learner when the driver has
        nothing to add between the two (no teacher actor, reward or step weights), in one call
        instead of two.

        The ranks swap their samples and each builds the batch the driver would have built
        (`training_batch`, then `LearnerSpec.shards`) and trains its own shard of it: the same
        step as over two calls. Returns this rank's samples (the driver logs them) and the
        step's metrics, with `rollout_s`, how long this rank sampled."""
        start = time.perf_counter()
        mine = self.generate(
            request.prompts,
            request.prompt_indices,
            request.seeds,
            sampling=request.sampling,
            expect_version=request.expect_version,
        )
        sampled = time.perf_counter() - start
        shares: list[list[Sample]] = [[] for _ in range(self.world_size)]
        torch.distributed.all_gather_object(shares, mine)
        samples = [sample for share in shares for sample in share]
        # The teacher is in this rank (or there is none): no signal travels with the samples.
        scores = [TeacherScore.empty(len(s.completion_ids)) for s in samples]
        version = self.sampler.weight_version()  # type: ignore[union-attr]  # it sampled
        batch = training_batch(samples, scores, pad_id, version, drop_truncated)
        shards, pad_fraction = self.spec.shards(batch)
        metrics = self.train_step(shards[self.rank], batch.num_tokens)
        metrics["learner/pad_fraction"] = pad_fraction
        metrics["rollout_s"] = sampled
        return mine, metrics

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return self.learner.logprobs(batch)

    def teacher_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return self.learner.teacher_logprobs(batch)

    def state_dict_blob(self) -> bytes | None:
        return self.learner.state_dict_blob()

    def adapter_blob(self) -> bytes | None:
        """A LoRA student's adapters as safetensors bytes on rank 0 (all ranks must call)."""
        state = self.learner.adapter_state_dict()
        return None if state is None else serialize_state_dict(state)

    def publish_weights(self) -> list[Any] | None:
        """Rank 0: `[ObjectRef]` of the weight blob; other ranks (which must join) None.

        The reference travels inside a list so that no layer on the way (Ray, a future
        wrapper) mistakes it for the result to resolve; Ray 2.60 would in fact hand a bare
        returned ref back unresolved too (checked). The driver must never hold the bytes.
        The object is owned by this actor and lives as long as it does.
        """
        import ray

        blob = self.learner.state_dict_blob()
        return None if blob is None else [ray.put(blob)]

    def publish_teacher_weights(self) -> list[Any] | None:
        """`publish_weights` of the self-teacher's weights (models.teacher: self: its EMA, or
        the live weights) for the teacher actors; rank 0 `[ObjectRef]`, the others None."""
        import ray

        blob = self.learner.teacher_blob()
        return None if blob is None else [ray.put(blob)]

    # --- The weight stream (sync.method=stream): rank 0 sends, every rank joins the gathers ---

    def weight_stream_address(self) -> tuple[str, int]:
        """Rank 0's node address and a port free there: the stream group's rendezvous."""
        import ray

        from rayd.cluster import free_port

        return ray.util.get_node_ip_address(), free_port()

    def weight_metadata(self) -> tuple[list[str], list[str], list[list[int]]]:
        return self.learner.weight_metadata()

    def open_weight_stream(
        self, address: str, port: int, world_size: int, timeout_s: float
    ) -> None:
        """Rank 0 joins the group as its rank 0 (blocks until the engines have joined)."""
        from rayd.rollout import weight_stream

        self.close_weight_stream()
        if self.rank == 0:
            self._stream = weight_stream.join_group(address, port, 0, world_size, timeout_s)

    def stream_weights(self, bucket_bytes: int, timeout_s: float) -> dict[str, float]:
        """One sync: every rank walks the weights (ZeRO-3 gathers), rank 0 broadcasts them in
        buckets. A failure drops the group at once, so no engine waits for the deadline."""
        from rayd.rollout import weight_stream

        start = time.perf_counter()
        tensors = self.learner.streamed_weights()
        if self.rank != 0:
            for _ in tensors:
                pass
            return {}
        if self._stream is None:
            raise RuntimeError("no weight-stream group: open_weight_stream first")
        _, dtypes, shapes = self.learner.weight_metadata()
        try:
            sent, buckets = weight_stream.send_buckets(
                self._stream, tensors, dtypes, shapes, bucket_bytes, timeout_s
            )
        except Exception:
            self.close_weight_stream()
            for _ in tensors:  # the other ranks' gathers still need this rank
                pass
            raise
        return {"bytes": sent, "buckets": buckets, "seconds": time.perf_counter() - start}

    def close_weight_stream(self) -> None:
        from rayd.rollout import weight_stream

        weight_stream.drop_group(self._stream)
        self._stream = None

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        self.learner.save_checkpoint(directory, tag, client_state)

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        client_state = self.learner.load_checkpoint(directory, tag)
        if self.sampler is not None:  # the driver's checkpoints: version = step
            self.sampler.weights_changed(client_state["step"])
        return client_state
