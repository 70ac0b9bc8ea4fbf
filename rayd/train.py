"""`python -m rayd.train CONFIG [key=value ...]`: on-policy distillation, top to bottom.

One step of the loop:
    prompts -> student rollouts (vLLM) -> teacher scores (top-k log-probs) -> learner step
    (DeepSpeed ZeRO) -> weight sync to the rollout engines -> periodic eval / checkpoint.
The same file runs under `ray job submit` (it joins that cluster) and on a laptop (it starts a
local Ray). Everything a step needs is visible here; the actors only own their backends.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import ray

from rayd import cluster
from rayd.config import ConfigError, RunConfig, load_config, save_config
from rayd.data.prompts import Prompt, PromptSampler, load_prompts
from rayd.evaluate import heldout_metrics
from rayd.metrics import MetricsLogger, StageTimer
from rayd.types import Sample, collate
from rayd.workers import check_models, check_resources, export_student, start_workers


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole job; returns the final metrics (also written to the run folder)."""
    # --- Set-up: everything that can be wrong is checked before any actor starts. ---------------
    run_dir = cfg.run_dir
    save_config(cfg, run_dir / "config.yaml")
    student_path, teacher_path, tokenizer = check_models(cfg)
    prompts = load_prompts(
        cfg.data,
        tokenizer,
        cfg.rollout.max_model_len - cfg.rollout.max_new_tokens,
        cfg.trainer.seed,
    )
    cluster.connect()
    check_resources(cfg, ray.cluster_resources())
    rollout, teacher, learners = start_workers(cfg, student_path, teacher_path)
    sampler = PromptSampler(len(prompts.train), cfg.trainer.seed)
    rng = random.Random(cfg.trainer.seed)
    log = MetricsLogger(run_dir, cfg.logging, cfg.trainer.max_steps)
    version = 0  # student weights version served by the rollout engines

    def evaluate(step: int) -> dict[str, float]:
        metrics = heldout_metrics(rollout, teacher, prompts.eval, prompts.task, cfg)
        log.log(step, metrics, advance=False)
        return metrics

    first_eval = evaluate(0)
    last_eval = first_eval
    algo = cfg.algorithm
    try:
        for step in range(1, cfg.trainer.max_steps + 1):
            timer = StageTimer()
            step_start = time.perf_counter()

            # 1. Prompts for this step (each training prompt once per epoch).
            batch_prompts = [prompts.train[i] for i in sampler.next(cfg.trainer.prompts_per_step)]

            # 2. Student rollouts. GKD's lambda sends a share of prompts to the dataset's own
            #    completions instead (off-policy); on_policy keeps lambda = 1.
            on_policy, off_policy = split_by_lambda(batch_prompts, algo.lmbda, rng)
            with timer("rollout"):
                samples = (
                    rollout.map_chunks(
                        "generate",
                        [p.ids for p in on_policy],
                        [p.index for p in on_policy],
                        n=cfg.rollout.n,
                        temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p,
                        max_new_tokens=cfg.rollout.max_new_tokens,
                    )
                    if on_policy
                    else []
                )
            samples += [
                dataset_sample(p, version) for p in off_policy for _ in range(cfg.rollout.n)
            ]
            stale = [
                s.weight_version for s in samples if s.on_policy and s.weight_version != version
            ]
            if stale:  # synchronous loop: every on-policy sample must come from current weights
                raise RuntimeError(
                    f"rollouts from weight versions {set(stale)}, expected {version}"
                )

            # 3. Teacher scores every completion token: its log-prob and its top-k.
            with timer("teacher"):
                scores = teacher.map_chunks(
                    "score",
                    [(s.prompt_ids, s.completion_ids) for s in samples],
                    top_k=cfg.teacher.top_k,
                )

            # 4. One optimizer step on the learner group (data parallel, ZeRO).
            with timer("learner"):
                batch = collate(samples, scores, tokenizer.pad_token_id)
                metrics = learners.train_step(batch)

            # 5. New weights to every rollout engine; the driver holds only a reference.
            with timer("sync"):
                weights = learners.publish_weights()
                version += 1
                rollout.call_all("load_weights", weights, version)

            # 6. Periodic held-out eval and checkpoint.
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                last_eval = evaluate(step)
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                learners.save_checkpoint(
                    str(run_dir / "checkpoints"),
                    f"step{step}",
                    {"step": step, "sampler": sampler.state()},
                )

            tokens = sum(len(s.completion_ids) for s in samples)
            step_time = time.perf_counter() - step_start
            metrics.update(step_metrics(samples, tokens, timer.seconds, step_time, version))
            log.log(step, metrics)
        if not cfg.trainer.eval_every or cfg.trainer.max_steps % cfg.trainer.eval_every:
            last_eval = evaluate(cfg.trainer.max_steps)
        export_student(learners, student_path, tokenizer, run_dir / "student")
    finally:
        log.close()
        for pool in (rollout, teacher):
            pool.shutdown()
        learners.shutdown()

    summary = {
        "steps": cfg.trainer.max_steps,
        "initial": first_eval,
        "final": last_eval,
        "student": str(run_dir / "student"),
        "metrics": str(log.path),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def split_by_lambda(prompts: list[Prompt], lmbda: float, rng: random.Random):
    """GKD mixing: a prompt goes on-policy with probability lambda, else to its dataset answer."""
    if lmbda >= 1.0:
        return prompts, []
    on, off = [], []
    for p in prompts:
        (on if rng.random() < lmbda or p.completion_ids is None else off).append(p)
    return on, off


def dataset_sample(prompt: Prompt, version: int) -> Sample:
    assert prompt.completion_ids is not None
    return Sample(
        prompt_ids=prompt.ids,
        completion_ids=list(prompt.completion_ids),
        logprobs=[0.0] * len(prompt.completion_ids),
        prompt_index=prompt.index,
        weight_version=version,
        on_policy=False,
    )


def step_metrics(
    samples: list[Sample], tokens: int, seconds: dict[str, float], step_time: float, version: int
) -> dict[str, float]:
    out: dict[str, float] = {f"time/{k}": v for k, v in seconds.items()}
    for stage, secs in seconds.items():
        out[f"tokens_per_s/{stage}"] = tokens / max(secs, 1e-9)
    out["tokens_per_s"] = tokens / max(step_time, 1e-9)
    out["completion_tokens"] = tokens
    out["completion_len/mean"] = tokens / max(len(samples), 1)
    out["truncated_fraction"] = sum(s.finish_reason == "length" for s in samples) / len(samples)
    out["weight_version"] = version
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rayd.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps({"initial": summary["initial"], "final": summary["final"]}, indent=2))
    print(f"rayd: student saved to {summary['student']}; metrics in {summary['metrics']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
