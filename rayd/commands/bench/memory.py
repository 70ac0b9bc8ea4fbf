"""The student's memory levers: peak memory of one learner and its step time, with and without
each of learner.gradient_checkpointing, offload_optimizer, offload_params (ZeRO-3) and lora.

Every variant trains the same model on the same batch in a process of its own (`LearnerWorker`,
world size 1 over gloo), so its peak is its own: on a GPU the peak of allocated device memory
(`torch.cuda.max_memory_allocated`), on a CPU the peak resident set of the process (everything:
Python, torch, DeepSpeed, the model, its gradients, the optimizer state and the activations).
`start_mib` is the memory in use once the engine is built, before the first step; `peak_mib`
the peak over the steps after it (start-up's own peak is left out); `step_mib` their difference,
what training adds: activations, gradients, the optimizer state the first step creates.

On a CPU, offload moves state from host memory to host memory: its rows show what the
bookkeeping costs, not a saving. The saving offload exists for is device memory, which only a GPU
run of this section shows (it runs unchanged there).
Variants run one after another, so a noisy machine moves the step times between them; the
memory figures do not depend on the load.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# name -> (zero stage, learner levers)
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    "zero2": (2, {}),
    "zero2+checkpointing": (2, {"gradient_checkpointing": True}),
    "zero2+offload_optimizer": (2, {"offload_optimizer": True}),
    "zero3": (3, {}),
    "zero3+offload_all": (3, {"offload_optimizer": True, "offload_params": True}),
    "zero2+lora": (2, {"lora": {"r": 8, "alpha": 16.0}}),
    "zero2+lora+checkpointing": (
        2,
        {"lora": {"r": 8, "alpha": 16.0}, "gradient_checkpointing": True},
    ),
}


def reset_peak() -> float:
    """Start a new peak at the memory in use now, and return that (MiB)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    # Hand memory freed during start-up back to the system first, so it is not counted as
    # in use; then Linux's "5" to clear_refs sets the peak resident set (VmHWM) to the current.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mib("VmHWM")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args: dict[str, Any]) -> dict[str, Any]:
    """One variant in this process: build the learner, a warm-up step, then timed steps."""
    import torch

    from rayd.cluster import free_port
    from rayd.commands.bench.learner import SPEC, make_batch
    from rayd.config import RunConfig
    from rayd.learner.spec import LearnerSpec
    from rayd.learner.worker import LearnerWorker

    stage, levers = VARIANTS[args["variant"]]
    torch.set_num_threads(args["threads"])
    batch = make_batch(args["vocab"], args["rows"], 16, args["completion_len"])
    cfg = RunConfig.model_validate(
        {
            "models": {"student": {"path": args["model"]}, "teacher": {"path": args["model"]}},
            "learner": {
                "num_learners": 1,
                "zero_stage": stage,
                "micro_batch_size": len(batch),
                "grad_accum": 1,
                "threads": args["threads"],
                **levers,
            },
            "trainer": {"max_steps": 1000, "prompts_per_step": len(batch)},
        }
    )
    from dataclasses import replace

    spec = replace(LearnerSpec.from_config(cfg, args["model"]), loss=SPEC)
    worker = LearnerWorker(0, 1, "127.0.0.1", free_port(), spec)
    start = reset_peak()
    worker.train_step(batch, batch.num_tokens)  # warm-up: optimizer state, lazy buffers
    times = []
    for _ in range(args["steps"]):
        began = time.perf_counter()
        worker.train_step(batch, batch.num_tokens)
        times.append(time.perf_counter() - began)
    trainable = sum(
        getattr(p, "ds_numel", p.numel())
        for p in worker.learner.engine.module.parameters()
        if p.requires_grad
    )
    peak = peak_mib()
    return {
        "peak_mib": round(peak, 1),
        "start_mib": round(start, 1),
        "step_mib": round(peak - start, 1),
        "step_s": statistics.median(times),
        "trainable_params": trainable,
        "loss_tokens": batch.num_tokens,
    }


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayd.models import build_tiny_llama, count_params

    arch = dict(layers=2, hidden=256, heads=4) if quick else dict(layers=4, hidden=512, heads=8)
    model = str(build_tiny_llama(workdir / "model", seed=0, max_positions=512, **arch))
    rows, completion_len = (4, 112) if quick else (4, 240)
    settings = {
        "model": model,
        "vocab": int(AutoConfig.from_pretrained(model).vocab_size),
        "rows": rows,
        "completion_len": completion_len,
        "steps": 2 if quick else 5,
        "threads": min(2, os.cpu_count() or 1),
    }
    variants: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        variants[name] = measure(name, settings)
    base = variants["zero2"]
    for result in variants.values():
        result["peak_over_zero2"] = result["peak_mib"] / base["peak_mib"]
        result["step_mib_over_zero2"] = result["step_mib"] / base["step_mib"]
        result["time_over_zero2"] = result["step_s"] / base["step_s"]
    return {
        "variants": variants,
        "model_params": count_params(AutoModelForCausalLM.from_pretrained(model)),
        "batch": {"rows": rows, "tokens_per_row": 16 + completion_len},
        "memory_kind": "cuda max_memory_allocated" if _cuda() else "process peak RSS",
        "notes": [
            "one learner (world size 1) per variant, each in its own process; peak = device "
            "memory on a GPU, the process's peak resident set on a CPU (so it includes "
            "Python, torch and DeepSpeed themselves); step_s = median of the timed steps "
            "after a warm-up",
            "on a CPU, offload moves state from host memory to host memory: no saving is "
            "expected there",
        ],
    }


def measure(variant: str, settings: dict[str, Any]) -> dict[str, Any]:
    args = json.dumps({**settings, "variant": variant})
    env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"])}
    done = subprocess.run(
        [sys.executable, "-m", "rayd.commands.bench.memory", args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"memory variant {variant} failed:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
