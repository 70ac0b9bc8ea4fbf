"""sync.method=stream on real vLLM (CPU) engines: the weights of two ZeRO-3 learners stream to two
engines and a tensor-parallel one in buckets (rayd.weight_sync.WeightStream and
rayd.rollout.weight_stream), and each engine's teacher-forced log-probs must then be those of the
learners' model. Tiny buckets (every weight in pieces) must give exactly what the blob path gives;
a withheld tensor, a skipped finalize step, an engine lost mid-rollout or mid-sync and a stalled
one must each be caught.

The engines start once for the module (three vLLM engines, about a minute on 2 cores).
"""

from __future__ import annotations

import os
import signal

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rayd.cluster import WorkerPool, free_port, get
from rayd.config import RunConfig, SyncConfig
from rayd.learner.group import LearnerGroup
from rayd.learner.spec import LearnerSpec
from rayd.models import build_tiny_llama
from rayd.rollout.group import engine_options, spawn_engines
from rayd.rollout.weight_stream import join_group, send_buckets
from rayd.rollout.worker import FAILED_LOAD, RolloutWorker
from rayd.sampling import Sampling
from rayd.weight_sync import WeightStream, serialize_state_dict

import helpers

TIMEOUT = 300
RANKS = [1, 1, 2]  # ranks per engine of the pool below
# RAYD_TEST_GPU=1 (launch/gpu_check_weight_stream.sh): the engines on GPUs, one per rank (4),
# the learners on CPU; the buckets go through host memory over gloo, as on a GPU cluster.
GPU = os.environ.get("RAYD_TEST_GPU") == "1"
ATOL = 1e-3 if GPU else 1e-4  # GPU kernels round apart from the CPU reference model
# A 150-token prompt fills a 128-token KV block: a stale prefix cache after a sync would show.
GEN = torch.Generator().manual_seed(2)
SEQUENCES = [torch.randint(4, 80, (170,), generator=GEN).tolist(), [5, 9, 12, 7, 30, 41]]


def forced_logprobs(model, sequence) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(sequence[1:])[:, None]).squeeze(-1)


def load_hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """What the learners hold: the engines' architecture, other weights."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("trained"), layers=2, hidden=64, heads=2, max_positions=512, seed=7
    )


@pytest.fixture(scope="module")
def engines(ray_local, tiny_student):
    """Two single-rank engines and a tensor-parallel one (2 ranks), as one rollout pool that
    Ray may restart (the lost-engine test)."""
    specs = [helpers.engine_spec(tiny_student, "vllm", dtype="auto", max_model_len=256)] * 2
    specs.append(
        helpers.engine_spec(
            tiny_student, "vllm", dtype="auto", max_model_len=256, tensor_parallel_size=2
        )
    )
    actors, groups = spawn_engines(
        RolloutWorker, specs, engine_options(1, int(GPU), restarts=2), TIMEOUT
    )
    pool = WorkerPool(actors, "rollout", TIMEOUT, max_reissues=1, placement_groups=groups)
    assert all(pool.call_all("ready"))
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def learners(ray_local, trained):
    cfg = RunConfig.model_validate(
        {
            "models": {"student": {"path": str(trained)}, "teacher": {"path": str(trained)}},
            "learner": {"num_learners": 2, "zero_stage": 3, "micro_batch_size": 4},
            "trainer": {"prompts_per_step": 8},
        }
    )
    with LearnerGroup(LearnerSpec.from_config(cfg, str(trained))) as group:
        yield group


def engine_logprobs(pool) -> list[list[torch.Tensor]]:
    return pool.call_all("logprobs", SEQUENCES)


def assert_serves(pool, model, version) -> None:
    want = [forced_logprobs(model, s) for s in SEQUENCES]
    assert pool.call_all("weight_version") == [version] * len(pool)
    per_engine = engine_logprobs(pool)
    for got in per_engine:
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    # The two single-rank engines hold the very same weights.
    for a, b in zip(per_engine[0], per_engine[1], strict=True):
        assert torch.equal(a, b)


def test_streamed_weights_are_the_learners_and_match_the_blob_path(
    engines, learners, tiny_student, trained
):
    old, new = load_hf(tiny_student), load_hf(trained)
    assert_serves(engines, old, 0)
    stream = WeightStream(learners, engines, SyncConfig(bucket_mib=1), RANKS)
    stream.sync(1)
    assert stream.last["sync/buckets"] == 1
    assert_serves(engines, new, 1)
    # 4 KiB buckets: every layer spans buckets and the embedding and MLP weights travel in
    # pieces; the engines end bit for bit where the blob path puts them.
    stream.cfg = SyncConfig(bucket_mib=4 / 1024)
    stream.sync(2)
    assert stream.last["sync/buckets"] > 20
    streamed = engine_logprobs(engines)
    blob = serialize_state_dict(new.state_dict())
    assert engines.call_all("load_weights", blob, 3) == [3] * 3
    for s, b in zip(streamed, engine_logprobs(engines), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(s, b, strict=True))
    stream.close()


def kill(actor) -> None:
    os.kill(get(actor.__ray_call__.remote(lambda w: os.getpid()), TIMEOUT, "pid"), signal.SIGKILL)


def test_an_engine_lost_mid_rollout_hands_its_chunk_to_another(engines, learners, trained):
    """pool.reroute (a streamed run of several engines): an engine lost during a rollout gets no
    weights from the learners then (they may be training past its version); its chunk, the
    same slice, goes to a serving engine and comes back as it would have, and the next sync
    streams to it too."""
    new = load_hf(trained)
    stream = WeightStream(learners, engines, SyncConfig(bucket_mib=1), RANKS)
    stream.sync(5)
    prompts = [s[:40] for s in SEQUENCES] * 3
    call = {"sampling": Sampling.plain(12), "seed": 3, "expect_version": 5}
    want = engines.map_chunks("generate", prompts, list(range(len(prompts))), **call)
    faults = engines.faults
    kill(engines.actors[1])
    engines.reroute = True
    try:
        got = engines.map_chunks("generate", prompts, list(range(len(prompts))), **call)
        assert engines.faults == faults + 1 and engines.unserved == {1}
        assert [(s.completion_ids, s.logprobs) for s in got] == [
            (s.completion_ids, s.logprobs) for s in want
        ]
        stream.sync(6)  # a new group: the restored engine is back in it
        assert not engines.unserved
        assert_serves(engines, new, 6)
    finally:
        engines.reroute = False
        stream.close()


def by_hand(pool, actors, model, *, withhold=(), bucket_bytes=4096, version=9):
    """This process as the group's rank 0, sending `model`'s weights (minus `withhold`)."""
    state = {k: v for k, v in model.state_dict().items() if k not in withhold}
    port = free_port()
    world = 1 + len(actors)
    joins = [
        a.join_weight_stream.remote(
            {
                "master_address": "127.0.0.1",
                "master_port": port,
                "rank_offset": 1 + i,
                "world_size": world,
                "timeout_s": 60.0,
            }
        )
        for i, a in enumerate(actors)
    ]
    group = join_group("127.0.0.1", port, 0, world, 60.0)
    get(joins, TIMEOUT, "join")
    update = {
        "names": list(state),
        "dtype_names": [str(t.dtype).removeprefix("torch.") for t in state.values()],
        "shapes": [list(t.shape) for t in state.values()],
        "bucket_bytes": bucket_bytes,
        "version": version,
    }
    receivers = [a.receive_weights.remote(update, version) for a in actors]
    send_buckets(group, state.values(), update["dtype_names"], update["shapes"], bucket_bytes, 60.0)
    return receivers, group


def test_a_withheld_tensor_fails_the_sync_and_the_engine_refuses_to_sample(engines, tiny_student):
    actor = engines.actors[0]
    model = load_hf(tiny_student)
    receivers, _group = by_hand(
        engines, [actor], model, withhold=("model.layers.1.mlp.down_proj.weight",)
    )
    with pytest.raises(ray.exceptions.RayTaskError, match=r"unloaded.*down_proj"):
        get(receivers, TIMEOUT, "receive")
    assert get(actor.weight_version.remote(), TIMEOUT, "version") == FAILED_LOAD
    get(actor.load_weights.remote(serialize_state_dict(model.state_dict()), 4), TIMEOUT, "load")


def test_a_lost_engine_is_restored_and_a_stalled_one_named(engines, learners, trained):
    """An engine killed between syncs breaks the next one: the single-rank survivors leave the
    group, Ray restarts the dead one (and the tensor-parallel one), all load a blob built then
    from the learners, and the group forms anew at the sync after. An engine that stops
    answering (SIGSTOP) ends the sync at its deadline, in one line naming it."""
    new = load_hf(trained)
    stream = WeightStream(learners, engines, SyncConfig(bucket_mib=1, timeout_s=10), RANKS)
    stream.sync(6)
    faults = engines.faults
    kill(engines.actors[0])
    stream.sync(6)
    # The killed engine, and the tensor-parallel one (restarted: see WeightStream._recover).
    assert engines.faults == faults + 2
    assert_serves(engines, new, 6)
    stream.sync(7)  # a new group, the restored engine in it
    assert stream.last["sync/bytes"] > 0
    assert_serves(engines, new, 7)

    pid = get(engines.actors[1].__ray_call__.remote(lambda w: os.getpid()), TIMEOUT, "pid")
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(RuntimeError, match=r"rollout engine\(s\) \[1\] did not finish"):
            stream.sync(8)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_skipping_the_finalize_step_breaks_parity(engines, tiny_student, trained):
    """The negative control: without vLLM's finalize step the layers are left in their
    loading state, and the engine does not serve the weights it was sent (it fails, or
    serves others)."""
    actor = engines.actors[1]
    new = load_hf(trained)

    def skip_finalize(worker, skip):
        import vllm.model_executor.model_loader.reload as reload

        if skip:
            reload._rayd_saved = reload.finalize_layerwise_reload
            reload.finalize_layerwise_reload = lambda *a, **k: None
        else:
            reload.finalize_layerwise_reload = reload._rayd_saved

    get(actor.__ray_call__.remote(skip_finalize, True), TIMEOUT, "patch")
    try:
        receivers, _group = by_hand(engines, [actor], new, bucket_bytes=1 << 20)
        get(receivers, TIMEOUT, "receive")
        got = get(actor.logprobs.remote(SEQUENCES), TIMEOUT, "logprobs")
        want = [forced_logprobs(new, s) for s in SEQUENCES]
        broken = any(not torch.allclose(g, w, atol=ATOL) for g, w in zip(got, want, strict=True))
    except ray.exceptions.RayTaskError:
        broken = True
    finally:
        get(actor.__ray_call__.remote(skip_finalize, False), TIMEOUT, "unpatch")
    assert broken
    # Its layers are half in their loading state: only a new engine would serve again (this
    # test runs last; the module's pool goes with it).
