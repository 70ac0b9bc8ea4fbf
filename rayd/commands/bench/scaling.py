"""Scaling on a simulated two-node cluster (`ray.cluster_utils.Cluster`: two raylets, two object
stores, one machine).

Rollout workers: 1, 2 and 4 `RolloutWorker` actors (vllm backend, one CPU and one thread each),
spread over the two nodes by a SPREAD placement group, share the same prompts through rayd's
`WorkerPool.map_chunks`, as a run's rollout stage does; tokens/s = completion tokens / seconds.
The nodes split logical CPUs, not cores: on a 2-core machine more than 2 workers cannot run
faster, and the figures say so.

Weight sync: as train.py's `sync_weights`, a publisher (standing in for learner rank 0, on the
head node) serialises the state dict (`rayd.weight_sync`) and puts it in its object store; every
engine then gets the reference and runs `load_weights`, fetching the blob into its own node's
store. Timed per model size, with one engine and with two (one per node).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import ray

from rayd.cluster import WorkerPool, get
from rayd.sampling import Sampling

TIMEOUT_S = 900
TINY = "tiny:addition-student"
# name -> (layers, hidden, heads): about 1M, 10M and 40M parameters with the character vocab
SIZES = {"1m": (4, 128, 2), "10m": (8, 256, 4), "40m": (10, 512, 8)}


class Publisher:
    """Learner rank 0's part of a weight sync: state dict -> safetensors blob -> object store."""

    def __init__(self, model_path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    def publish(self) -> tuple[list[Any], int]:
        """([ref], bytes): the reference inside a list, as LearnerWorker.publish_weights."""
        from rayd.weight_sync import serialize_state_dict

        blob = serialize_state_dict(self.model.state_dict())
        return [ray.put(blob)], len(blob)


def _node_of(actor: Any) -> str:
    return get(
        actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()),
        60,
        "node id",
    )


def _rollout_engines(model_path: str, count: int) -> tuple[list[Any], Any]:
    """`count` rollout actors, spread over the nodes; (actors, placement group)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rayd.config import RolloutConfig
    from rayd.rollout.group import engine_runtime_env
    from rayd.rollout.spec import EngineSpec
    from rayd.rollout.worker import RolloutWorker

    pg = placement_group([{"CPU": 1}] * count, strategy="SPREAD")
    get(pg.ready(), TIMEOUT_S, f"placement group of {count}")
    remote = ray.remote(RolloutWorker)
    actors = [
        remote.options(
            num_cpus=1,
            runtime_env=engine_runtime_env(),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i
            ),
        ).remote(
            EngineSpec.from_section(
                model_path,
                RolloutConfig(max_model_len=256, kv_cache_gib=0.25),
                dtype="auto",
                seed=i,
                max_logprobs=20,
            )
        )
        for i in range(count)
    ]
    get([a.ready.remote() for a in actors], TIMEOUT_S, "rollout engines start")
    return actors, pg


def rollout_scaling(quick: bool) -> dict[str, Any]:
    from ray.util.placement_group import remove_placement_group
    from transformers import AutoTokenizer

    from rayd.data.prompts import encode_prompt
    from rayd.tasks import make_task
    from rayd.zoo import resolve_model_path

    model = resolve_model_path(TINY)
    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = make_task("addition", digits=3, seed=0).examples("eval", 16 if quick else 64)
    prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]
    indices = list(range(len(prompts)))
    counts = (1, 2) if quick else (1, 2, 4)
    reps = 2 if quick else 3
    actors, pg = _rollout_engines(model, max(counts))
    try:
        nodes = [_node_of(a) for a in actors]
        per_count: dict[str, float] = {}
        for count in counts:
            pool = WorkerPool(actors[:count], "rollout", TIMEOUT_S, max_reissues=0)

            def call(pool: WorkerPool = pool) -> int:
                samples = pool.map_chunks(
                    "generate",
                    prompts,
                    indices,
                    sampling=Sampling.plain(64 if quick else 128),
                    seed=0,
                )
                return sum(len(s.completion_ids) for s in samples)

            call()  # warm-up: every engine's first batch
            times, tokens = [], 0
            for _ in range(reps):
                start = time.perf_counter()
                tokens = call()
                times.append(time.perf_counter() - start)
            per_count[str(count)] = tokens / statistics.median(times)
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(pg)
    base = per_count["1"]
    return {
        "rollout_workers": per_count,
        "speedup_over_1_worker": {k: v / base for k, v in per_count.items()},
        "workers_per_node": {n[:8]: nodes.count(n) for n in dict.fromkeys(nodes)},
        "prompts": len(prompts),
    }


def weight_sync(quick: bool, workdir: Path) -> dict[str, Any]:
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rayd.models import build_tiny_llama

    sizes = {k: v for k, v in SIZES.items() if not (quick and k == "40m")}
    reps = 2 if quick else 3
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head node
    out: dict[str, Any] = {}
    for name, (layers, hidden, heads) in sizes.items():
        path = str(build_tiny_llama(workdir / name, layers=layers, hidden=hidden, heads=heads))
        publisher = (
            ray.remote(Publisher)
            .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head, False))
            .remote(path)
        )
        engines, pg = _rollout_engines(path, 2)
        try:
            version = 0
            figures: dict[str, Any] = {}
            for count in (1, 2):
                publish_s, load_s = [], []
                for _ in range(reps + 1):  # the first sync is a warm-up
                    version += 1
                    start = time.perf_counter()
                    ref_box, size = get(publisher.publish.remote(), TIMEOUT_S, "publish")
                    published = time.perf_counter()
                    get(
                        [e.load_weights.remote(ref_box[0], version) for e in engines[:count]],
                        TIMEOUT_S,
                        "load_weights",
                    )
                    publish_s.append(published - start)
                    load_s.append(time.perf_counter() - published)
                publish, load = statistics.median(publish_s[1:]), statistics.median(load_s[1:])
                figures[f"engines_{count}"] = {
                    "publish_s": publish,
                    "load_s": load,
                    "total_s": publish + load,
                    "mb_per_s": size / 2**20 / (publish + load),
                }
            one, two = figures["engines_1"]["total_s"], figures["engines_2"]["total_s"]
            out[name] = {
                "params": _params(path),
                "blob_mb": size / 2**20,
                "two_over_one_engine_time": two / one,
                "engine_nodes": sorted({_node_of(e)[:8] for e in engines}),
                **figures,
            }
        finally:
            for actor in (*engines, publisher):
                ray.kill(actor)
            remove_placement_group(pg)
    return out


def _params(path: str) -> int:
    from transformers import AutoModelForCausalLM

    from rayd.models import count_params

    return count_params(AutoModelForCausalLM.from_pretrained(path))


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    from rayd.commands.bench import ray_runtime_env

    cores = os.cpu_count() or 1
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=ray_runtime_env())
        result = rollout_scaling(quick)
        sync = weight_sync(quick, workdir)
    finally:
        ray.shutdown()
        cluster.shutdown()
    sizes = list(sync)
    small, large = sync[sizes[0]], sync[sizes[-1]]
    engine_factor = statistics.mean(s["two_over_one_engine_time"] for s in sync.values())
    return {
        **result,
        "weight_sync": sync,
        "sync_time_large_over_small": large["engines_1"]["total_s"] / small["engines_1"]["total_s"],
        "size_large_over_small": large["blob_mb"] / small["blob_mb"],
        # Both engines fetch and load at once: the same time means it grows with size alone.
        "sync_grows_with": "size" if engine_factor < 1.5 else "engines x size",
        "nodes": 2,
        "logical_cpus_per_node": 2,
        "physical_cores": cores,
        "notes": [
            f"two simulated nodes of 2 logical CPUs each on a machine with {cores} cores: "
            f"{cores} busy workers at most run at once, so throughput cannot grow past "
            f"{cores} workers here",
            "weight sync: publisher on the head node, one engine per node; sync_grows_with says "
            "'size' when two engines take under 1.5x one engine's time (mean over sizes); "
            "mb_per_s = blob MB / (publish + load) seconds",
        ],
    }
