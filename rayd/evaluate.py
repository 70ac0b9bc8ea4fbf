"""Evaluation: the held-out metrics of a training run, and a model folder's task accuracy.

`heldout_metrics` runs with the live rollout and teacher actors of a run. Reverse
KL(student || teacher) is estimated on the student's own samples, per token:
    mean_t [log p_student(x_t) - log p_teacher(x_t)],  x ~ student at temperature 1,
the quantity on-policy distillation minimises. A fixed seed makes successive evals comparable.
With several teachers the teacher is the one training distils from: the ensemble's exact
log sum_i w_i p_i(x_t), or under routing each prompt's own teacher; eval/teacher/<name>/
reverse_kl adds each teacher's alone (ensemble: on every sample; route: on its prompts).
Accuracy (greedy decoding + the task's verifier) is added when the prompts come from a task;
with trainer.eval_sample_temperature also eval/sampled_accuracy, one seeded draw per prompt at
that temperature (the accuracy of the policy the student samples from, not only its mode).

`evaluate_model` scores a finished model folder on a task's eval split in an engine actor of
its own (`rayd eval`, `rayd export`'s card, `rayd demo`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from rayd.cluster import WorkerPool
from rayd.data.prompts import Prompt
from rayd.sampling import Sampling
from rayd.tasks.base import Task
from rayd.teacher.group import LearnerTeacher, Teachers
from rayd.teacher.privileged import PrivilegedContext
from rayd.types import Sample

# `generate(prompt ids, prompt indices, *, sampling, seed)`: a rollout worker's (or pool's)
# generate, called in this process or through Ray.
Generate = Callable[..., list[Sample]]


def eval_sample_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s sampled-accuracy draw: a rerun or a resumed run draws the same
    samples, and successive evals draw fresh ones (one fixed draw would follow the same few
    tokens' luck through the whole run)."""
    return random.Random(f"{seed}:eval_sample:{step}").getrandbits(31)


def task_accuracy(
    generate: Generate,
    ids: list[list[int]],
    indices: list[int],
    answers: Sequence[str],
    task: Task,
    sampling: Sampling,
    seed: int | None = None,
) -> tuple[float, list[Sample], list[bool]]:
    """(accuracy, samples, which were right) of one completion per prompt drawn with
    `sampling` (greedy, or one seeded draw at a temperature)."""
    if sampling.n != 1:
        raise ValueError(f"accuracy scores one completion per prompt, got n={sampling.n}")
    samples = generate(ids, indices, sampling=sampling, seed=seed)
    right = [task.is_correct(s.text, a) for s, a in zip(samples, answers, strict=True)]
    return sum(right) / len(right), samples, right


def heldout_metrics(
    rollout: WorkerPool,
    teacher: Teachers | LearnerTeacher | None,
    prompts: list[Prompt],
    task: Task | None,
    *,
    max_new_tokens: int,
    seed: int,
    version: int,
    feedback: PrivilegedContext | None = None,
    samples_per_prompt: int = 1,
    sample_temperature: float | None = None,
    sample_seed: int = 0,
) -> dict[str, float]:
    """The eval/ metrics of the weights the engines serve (`version`): reverse KL to the
    teacher on `seed`-drawn temperature-1 samples, greedy accuracy when the prompts have a
    task, completion lengths. `teacher` None: accuracy only (sft, step_by_step).

    The teacher scores after each prompt's own teacher prompt where it is shown privileged
    context (`Prompt.teacher_ids`); with `feedback` (teacher.privileged_context=feedback) each
    prompt gets `samples_per_prompt` samples, the teacher is shown a correct one of them as in
    training, and the KL covers the samples that had one (eval/unscored_fraction: the rest).

    `sample_temperature` (with a task): eval/sampled_accuracy too, from one more generation
    pass, one draw per prompt at that temperature seeded by `sample_seed`."""
    ids, indices = [p.ids for p in prompts], [p.index for p in prompts]
    samples = rollout.map_chunks(
        "generate",
        ids,
        indices,
        sampling=Sampling(samples_per_prompt, 1.0, 1.0, max_new_tokens),
        seed=seed,
        expect_version=version,
    )
    tokens = sum(len(s.completion_ids) for s in samples)
    out = {"eval/completion_len": tokens / len(samples)}
    if teacher is not None:  # runs without a teacher (sft, step_by_step) report accuracy only
        if feedback is not None:
            feedback.attach(samples)
        asked = [s for s in samples if s.asks_teacher]
        if feedback is not None:
            out["eval/unscored_fraction"] = 1.0 - len(asked) / len(samples)
        if asked:
            routing = [prompts[s.prompt_index] for s in asked]
            pairs = [
                (s.teacher_prompt_ids or p.teacher_ids or s.prompt_ids, s.completion_ids)
                for s, p in zip(asked, routing, strict=True)
            ]
            # Only the sampled tokens' log-probs are used: no exact pass over an ensemble's
            # support.
            scored = teacher.score("score", pairs, prompts=routing, mix_support=False, top_k=1)
            gap = sum(
                sum(s.logprobs) - float(sc.token_logprobs.sum())
                for s, sc in zip(asked, scored.scores, strict=True)
            )
            out["eval/reverse_kl"] = gap / max(sum(len(s.completion_ids) for s in asked), 1)
            out.update(teacher.metrics(asked, scored, "eval/teacher/"))
    if task is not None:

        def generate(*args: Any, **kwargs: Any) -> list[Sample]:
            return rollout.map_chunks("generate", *args, expect_version=version, **kwargs)

        answers = [p.answer or "" for p in prompts]
        greedy = Sampling.greedy(max_new_tokens)
        out["eval/accuracy"], _, _ = task_accuracy(generate, ids, indices, answers, task, greedy)
        if sample_temperature is not None:
            drawn = Sampling.plain(max_new_tokens, sample_temperature)
            out["eval/sampled_accuracy"], _, _ = task_accuracy(
                generate, ids, indices, answers, task, drawn, seed=sample_seed
            )
    return out


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with `correct` right (Chen et al. 2021, Codex)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def eval_prompts(
    tokenizer: Any,
    task: Task,
    count: int,
    *,
    chat_template: bool,
    max_prompt_len: int,
    long_prompts: str = "error",
    split: str = "eval",
) -> tuple[list[Any], list[list[int]]]:
    """(examples, prompt ids) of the held-out `split` (data.eval_split), encoded as training
    encodes them (rayd.data.prompts.encode_row: chat template, data.long_prompts)."""
    from rayd.config import DataConfig
    from rayd.data.prompts import encode_row

    data = DataConfig(chat_template="auto" if chat_template else "never", long_prompts=long_prompts)
    examples, ids = [], []
    for e in task.examples(split, count):
        encoded = encode_row(tokenizer, e.prompt, None, max_prompt_len, data, "eval")
        if encoded is not None:  # None: data.long_prompts=drop dropped it
            examples.append(e)
            ids.append(encoded[0])
    return examples, ids


def evaluate_model(
    model: str,
    task: Task,
    *,
    count: int = 200,
    split: str = "eval",
    ks: tuple[int, ...] = (),
    samples: int = 0,
    temperature: float | None = None,
    max_new_tokens: int = 64,
    backend: str = "vllm",
    max_model_len: int | None = None,
    seed: int = 0,
    chat_template: bool = True,
    long_prompts: str = "error",
    dtype: str = "auto",
) -> dict[str, Any]:
    """`score_task` on the eval split, generated by a rollout engine actor on the local or
    joined Ray cluster."""
    import ray
    from transformers import AutoConfig, AutoTokenizer

    from rayd import cluster
    from rayd.config import RolloutConfig
    from rayd.rollout.group import engine_runtime_env
    from rayd.rollout.spec import EngineSpec
    from rayd.rollout.worker import RolloutWorker

    tokenizer = AutoTokenizer.from_pretrained(model)
    if max_model_len is None:  # the model's own limit, capped where the KV cache stays small
        positions = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", 512)
        max_model_len = min(int(positions), 2048)
    examples, ids = eval_prompts(
        tokenizer,
        task,
        count,
        chat_template=chat_template,
        max_prompt_len=max_model_len - max_new_tokens,
        long_prompts=long_prompts,
        split=split,
    )
    cluster.connect()
    worker = (
        ray.remote(RolloutWorker)
        .options(num_cpus=1, runtime_env=engine_runtime_env())
        .remote(
            EngineSpec.from_section(
                model,
                RolloutConfig(backend=backend, max_model_len=max_model_len),
                dtype=dtype,
                seed=seed,
                max_logprobs=20,
            )
        )
    )

    def generate(*args: Any, **kwargs: Any) -> list[Sample]:
        return cluster.get(worker.generate.remote(*args, **kwargs), 3600, "eval generate")

    try:
        out = {"model": model}
        out.update(
            score_task(
                generate,
                examples,
                ids,
                task,
                ks=ks,
                samples=samples,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                seed=seed,
            )
        )
    finally:
        ray.kill(worker)
    return out


def score_task(
    generate: Generate,
    examples: list[Any],
    ids: list[list[int]],
    task: Task,
    *,
    ks: tuple[int, ...] = (),
    samples: int = 0,
    temperature: float | None = None,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy accuracy of `examples` (prompt `ids`), and with a `temperature` as well:
    - with `ks`: pass@k from `samples` draws per prompt (at least max k) at it (default 1.0);
    - without: sampled_accuracy, one draw per prompt at it.
    Draws are seeded by `seed`, so a rerun draws the same."""
    indices = list(range(len(examples)))
    answers = [e.answer for e in examples]
    accuracy, greedy, right = task_accuracy(
        generate, ids, indices, answers, task, Sampling.greedy(max_new_tokens)
    )
    out: dict[str, Any] = {
        "prompts": len(examples),
        "accuracy": accuracy,
        "completion_len": sum(len(s.completion_ids) for s in greedy) / len(greedy),
        "examples": [
            {"prompt": e.prompt, "answer": e.answer, "completion": s.text, "correct": ok}
            for e, s, ok in zip(examples[:5], greedy, right, strict=False)
        ],
    }
    if ks:
        temperature = 1.0 if temperature is None else temperature
        n = max(samples, max(ks))
        drawn = generate(
            ids, indices, sampling=Sampling(n, temperature, 1.0, max_new_tokens), seed=seed
        )
        correct = [0] * len(examples)
        for s in drawn:
            correct[s.prompt_index] += task.is_correct(s.text, examples[s.prompt_index].answer)
        for k in ks:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
        out["samples_per_prompt"] = n
        out["temperature"] = temperature
    elif temperature is not None:
        out["sampled_accuracy"], _, _ = task_accuracy(
            generate,
            ids,
            indices,
            answers,
            task,
            Sampling.plain(max_new_tokens, temperature),
            seed=seed,
        )
        out["temperature"] = temperature
    return out
