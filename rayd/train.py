"""`python -m rayd.train CONFIG [key=value ...]`: distillation, top to bottom.

One step of the loop:
    prompts -> weight sync to the rollout engines -> student rollouts (vLLM) -> teacher scores
    (top-k log-probs) -> learner step (DeepSpeed ZeRO) -> periodic eval / checkpoint.
With trainer.max_staleness >= 1 the next step's rollouts start as soon as this step's are in,
while the teacher scores this step and the learners train on it (from weights at most that many
versions behind: rayd/pipeline.py).
The offline modes (sft, step_by_step, logit_kd) take the dataset's completions instead of
rollouts; the engines then get new weights only when an eval needs them. logit_kd over a
dataset written by `rayd score` reads the teacher's top-k from it and starts no teacher.
The same file runs under `ray job submit` (it joins that cluster) and on a laptop (it starts a
local Ray). Everything a step needs is visible here; the actors only own their backends.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import ray

from rayd import cluster
from rayd.checkpoint import LEARNER_TAG, CheckpointError, CheckpointStore
from rayd.config import AlgorithmConfig, ConfigError, RunConfig, load_config, save_config
from rayd.data.prompts import Prompt, PromptSampler, PromptSet, load_prompts
from rayd.evaluate import heldout_metrics
from rayd.learner.group import LearnerFailure
from rayd.metrics import MetricsLogger, StageTimer, start_trackers
from rayd.pipeline import (
    Draw,
    Pending,
    Prepared,
    TeacherStream,
    check_staleness,
    staleness_metrics,
)
from rayd.rollout.worker import prompt_seeds
from rayd.score import StoredSignal, load_stored_signal
from rayd.steps import weigh_steps
from rayd.tasks.base import Task
from rayd.teachers import Scored, Teachers, check_routes
from rayd.types import Sample, TeacherScore, TrainBatch, collate
from rayd.workers import (
    check_models,
    check_resources,
    export_student,
    feature_pairs,
    start_workers,
)


class NumericsError(RuntimeError):
    """Too many non-finite updates in a row: the run stops rather than corrupt the weights."""


class Preemption:
    """SIGTERM (a scheduler, `ray job stop`) asks the loop to checkpoint and stop after the
    current step; the handler only sets a flag, so no step is cut in half."""

    def __init__(self) -> None:
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught there
            self._previous = None

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole job; returns the final metrics (also written to the run folder).

    A learner that dies takes the DeepSpeed group with it (a collective cannot lose a rank):
    every actor is then rebuilt and the run resumes from its last checkpoint, at most
    `trainer.learner_restarts` times. Rollout and teacher actors recover in place (WorkerPool).
    """
    restarts = 0
    while True:
        try:
            return run_once(cfg, learner_restarts=restarts)
        except LearnerFailure as exc:
            if restarts >= cfg.trainer.learner_restarts:
                raise LearnerFailure(
                    f"{exc}; stopped after {restarts} learner restarts "
                    "(trainer.learner_restarts); the last checkpoint resumes the run"
                ) from exc
            restarts += 1
            print(
                f"rayd: {exc}; rebuilding the workers from the last checkpoint "
                f"(restart {restarts} of {cfg.trainer.learner_restarts})",
                file=sys.stderr,
            )
            trainer = cfg.trainer.model_copy(update={"resume": "auto"})
            cfg = cfg.model_copy(update={"trainer": trainer})


def run_once(cfg: RunConfig, learner_restarts: int = 0) -> dict[str, Any]:
    """One attempt at the job: set-up, (resume,) the loop, export."""
    # --- Set-up: everything that can be wrong is checked before any actor starts. ---------------
    run_dir = cfg.run_dir
    store = CheckpointStore(run_dir / "checkpoints", cfg.trainer.keep_checkpoints)
    resume_from = store.select(cfg.trainer.resume)
    driver_state = resume_from.driver_state() if resume_from else {}
    check_resume_compatible(cfg, driver_state)
    save_config(cfg, run_dir / "config.yaml")
    student_path, teacher_paths, tokenizer = check_models(cfg)
    # feature_kd and stored signal take one teacher (the config refuses several for them)
    teacher_path = teacher_paths[0] if teacher_paths else None
    features = feature_pairs(cfg, student_path, teacher_path)  # feature_kd's layer map, else []
    prompts = load_prompts(
        cfg.data,
        tokenizer,
        cfg.rollout.max_model_len - cfg.rollout.max_new_tokens,
        cfg.trainer.seed,
        route_field=cfg.teacher.route_field,
    )
    check_offline_data(cfg, prompts)
    check_routes(cfg, prompts)
    # logit_kd over a `rayd score` dataset reads the teacher's top-k from disk: no teacher actor.
    stored = load_stored_signal(cfg, prompts, teacher_path, tokenizer)
    # teacher.support=full: the learners run the teacher (the eval asks learner rank 0 too).
    in_learners = cfg.teacher.support == "full"
    if stored is not None and in_learners:
        raise ConfigError(
            "config error: teacher.support=full runs the teacher inside the learners, but the "
            "dataset carries a stored top-k signal (rayd score): drop one of the two"
        )
    trackers = start_trackers(run_dir, cfg)  # W&B when enabled: after the checks, before actors
    cluster.connect()
    check_resources(cfg, ray.cluster_resources(), with_teacher=stored is None and not in_learners)
    # One actor pool per teacher; several are combined per teacher.combine (rayd/teachers.py).
    rollout, teacher, learners = start_workers(
        cfg,
        student_path,
        teacher_paths if stored is None else None,
        features,
        vocab_size=len(tokenizer),
    )
    sampler = PromptSampler(len(prompts.train), cfg.trainer.seed)
    rng = random.Random(cfg.trainer.seed)
    start_step = driver_state.get("step", 0)
    log = MetricsLogger(
        run_dir, cfg.logging, cfg.trainer.max_steps, start_step=start_step, trackers=trackers
    )
    version = 0  # the learners' weights: one version per step
    served = 0  # the version the rollout engines hold
    nonfinite_in_row = 0

    def sync_weights() -> None:
        """New weights to every rollout engine (if they lag); the driver holds a reference."""
        nonlocal served
        if served == version:
            return
        weights = learners.publish_weights()
        rollout.remember("load_weights", weights, version)  # for a restarted engine
        rollout.call_all("load_weights", weights, version)
        served = version

    def evaluate(step: int) -> dict[str, float]:
        sync_weights()
        metrics = heldout_metrics(rollout, teacher, prompts.eval, prompts.task, cfg, version)
        log.log(step, metrics, advance=False)
        return metrics

    def save(step: int) -> None:
        if lag > 0:
            # The resumed run's engines start from the checkpoint's weights; the unbroken run's
            # must hold the same from here on, or their next rollouts would differ.
            sync_weights()
        staging = store.staging_dir(step)
        learners.save_checkpoint(str(staging / "learner"), LEARNER_TAG, {"step": step})
        store.commit(
            staging,
            step,
            {
                "version": version,
                # The sampler and RNG have already drawn the prefetched step: it is saved too.
                "sampler": sampler.state(),
                "rng": rng.getstate(),
                "prefetched": ahead.to_state() if isinstance(ahead, Prepared) else None,
                "nonfinite_in_row": nonfinite_in_row,
                "first_eval": first_eval,
                "last_eval": last_eval,
                "num_learners": cfg.learner.num_learners,
                "zero_stage": cfg.learner.zero_stage,
            },
        )

    def teacher_stream(chunks: Sequence[list[Sample]] = ()) -> TeacherStream:
        """A stream to the teacher actors (none for a stored signal, no teacher, or a teacher
        inside the learners: teacher.support=full), fed with `chunks` if given (a restored
        prefetched step's)."""
        ask = None
        if teacher is not None and stored is None and not in_learners:
            ask = partial(ask_teacher, cfg, teacher, features=features, prompts=prompts.train)
        stream = TeacherStream(ask, teacher_thread)
        for key, chunk in enumerate(chunks):
            stream.add(key, chunk)
        return stream

    def draw(step: int) -> Draw:
        """Step 1 of `step`, on the driver's thread (the sampler, RNG and tokenizer are used
        only here): its prompts, which of them go to the student, and the samples that need no
        rollout (dataset completions, step-by-step and label-task samples)."""
        trains_at = step - 1  # the learner version that trains this step (dataset samples')
        drawn = sampler.next(cfg.trainer.prompts_per_step)
        batch_prompts = [prompts.train[i] for i in drawn]
        # GKD's lambda sends a share of prompts to the dataset's own completions instead
        # (off-policy); on_policy keeps lambda = 1; the offline modes take the dataset's
        # completions only.
        if algo.offline:
            on_policy, off_policy = [], batch_prompts
        else:
            on_policy, off_policy = split_by_lambda(batch_prompts, algo.lmbda, rng)
        extra: list[Sample] = []
        if algo.name == "step_by_step":
            extra += [
                s
                for p in off_policy
                for s in step_by_step_samples(p, algo, tokenizer, prompts.task, trains_at)
            ]
        else:
            copies = 1 if algo.offline else cfg.rollout.n
            extra += [dataset_sample(p, trains_at) for p in off_policy for _ in range(copies)]
        if algo.label_weight > 0:  # Distilling Step-by-Step's label task, on gold answers
            extra += [
                label_sample(p, algo, tokenizer, prompts.task, trains_at) for p in batch_prompts
            ]
        return Draw(step, list(drawn), on_policy, extra)

    def roll_out(work: Draw, engine_version: int) -> Pending:
        """Step 2: the student's rollouts of `work`'s prompts from the weights the engines
        hold (`engine_version`). Each rollout worker's chunk goes to the teacher as soon as it
        arrives; the teacher is still scoring when this returns. Runs on the driver's thread,
        or on the rollout thread while the learners train (the pipelined loop)."""
        timer = StageTimer()
        stream = teacher_stream()
        with timer("rollout"), stream.cancel_on_error():
            indices = [p.index for p in work.on_policy]
            arriving = rollout.map_chunks_as_completed(
                "generate",
                [p.ids for p in work.on_policy],
                indices,
                # Over the whole batch: a prompt drawn twice draws apart on any two workers.
                prompt_seeds(rollout_seed(cfg.trainer.seed, work.step), indices),
                n=cfg.rollout.n,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                max_new_tokens=cfg.rollout.max_new_tokens,
                expect_version=engine_version,
                return_topk=cfg.student_topk,  # teacher.support: the student's ids
            )
            for key, chunk in arriving:  # none without on-policy prompts
                stream.add(key, chunk)
        if work.extra:
            stream.add(len(rollout), work.extra)
        return Pending(work.step, stream, work.prompt_indices, timer)

    def score(pending: Pending) -> Prepared:
        """Step 3: the teacher signal on every completion token: its log-prob and its
        log-probs over the support (its top-k, or the student's: teacher.support), from the
        teacher actors or stored with the dataset. Several teachers: their mixture, or each
        sample's routed teacher. sft / step_by_step: no teacher signal."""
        timer = pending.timer
        with timer("teacher"):
            chunks, scored = pending.stream.finish()
            samples = [s for chunk in chunks for s in chunk]
            scores, teacher_stats = teacher_signal(cfg, teacher, stored, samples, scored)
        seconds = timer.seconds
        if (teacher is None and stored is None) or in_learners:  # no teacher stage to report
            seconds.pop("teacher", None)
        return Prepared(
            pending.step, chunks, pending.prompt_indices, scores, teacher_stats, seconds
        )

    def ready(ahead: Pending | Prepared | None) -> Prepared | None:
        """The step made ahead with its teacher signal in: an eval or a checkpoint uses the
        teacher and the engines, which the stream must not share."""
        return score(ahead) if isinstance(ahead, Pending) else ahead

    algo = cfg.algorithm
    lag = cfg.trainer.max_staleness
    # max_staleness >= 1: the next step's rollouts are made on `rollout_thread` while the
    # teacher scores this step's and the learners train on it.
    rollout_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayd-rollout")
    # Every teacher call of the run's streams, in order, on one thread (see TeacherStream).
    teacher_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayd-teacher")
    next_rollouts: Future[Pending] | None = None
    ahead: Pending | Prepared | None = None  # the next step, made ahead (pipelined)
    preemption = Preemption()
    preempted = False
    try:
        if resume_from is not None:
            # Learners restore weights, optimizer/ZeRO state and LR schedule; the driver its
            # cursor and RNG; then the engines (which started from the initial student) get the
            # restored weights before they serve a single rollout.
            learners.load_checkpoint(resume_from.learner_dir, LEARNER_TAG)
            sampler.restore(driver_state["sampler"])
            rng.setstate(to_rng_state(driver_state["rng"]))
            version = driver_state["version"]
            nonfinite_in_row = driver_state["nonfinite_in_row"]
            first_eval, last_eval = driver_state["first_eval"], driver_state["last_eval"]
            sync_weights()
            if driver_state.get("prefetched"):  # rollouts from older weights: not redone
                restored = Prepared.from_state(driver_state["prefetched"])
                ahead = score(
                    Pending(restored.step, teacher_stream(restored.chunks), restored.prompt_indices)
                )
            print(f"rayd: resumed from {resume_from.path} (step {start_step})", file=sys.stderr)
        else:
            first_eval = evaluate(0)
            last_eval = first_eval
        for step in range(start_step + 1, cfg.trainer.max_steps + 1):
            timer = StageTimer()
            step_start = time.perf_counter()

            # 1-3. This step's prompts, rollouts and teacher signal (`draw`, `roll_out`,
            #      `score`): the rollouts made ahead during the previous step
            #      (max_staleness >= 1), or now from current weights.
            if ahead is None:
                if not algo.offline:
                    with timer("sync"):
                        sync_weights()
                ahead = roll_out(draw(step), served)
            pipelined = lag > 0 and step < cfg.trainer.max_steps
            if pipelined:
                # The engines are idle: the next step's rollouts start now, beside this step's
                # teacher scoring and learner step, from weights at most `lag` versions behind
                # the learner that will train them.
                if version + 1 - served > lag:
                    with timer("sync"):
                        sync_weights()
                next_rollouts = rollout_thread.submit(roll_out, draw(step + 1), served)
            work = ready(ahead)
            ahead = None
            samples, scores = work.samples, work.scores
            check_staleness(samples, version, lag)

            # 4. One optimizer step on the learner group (data parallel, ZeRO). Step weighting
            #    shares each rationale's loss among its reasoning steps (rayd/steps.py). Rows
            #    from older weights are marked stale (importance weights in the loss).
            batch = collate(samples, scores, tokenizer.pad_token_id, learner_version=version)
            if cfg.rollout.truncated == "drop":
                drop_truncated(batch, samples)
            step_stats: dict[str, float] = {}
            if algo.step_weighting != "none":
                marker = (prompts.task or Task.default()).marker
                batch.token_weight, step_stats = weigh_steps(
                    batch, samples, tokenizer, algo, marker
                )
            with timer("learner"):
                metrics = learners.finish_train_step(learners.start_train_step(batch))
            version += 1
            if next_rollouts is not None:  # its teacher signal is still being scored
                with timer("rollout_wait"):
                    ahead, next_rollouts = next_rollouts.result(), None

            tokens = sum(len(s.completion_ids) for s in samples)
            step_time = time.perf_counter() - step_start
            if teacher is None and stored is None:  # no teacher scores: a meaningless estimate
                metrics.pop("reverse_kl", None)
            per_own_tokens(metrics)
            metrics.update(step_stats)
            metrics.update(work.teacher_stats)
            seconds = {**work.seconds, **timer.seconds}
            metrics.update(step_metrics(samples, tokens, seconds, step_time, version))
            metrics.update(staleness_metrics(samples, version - 1))
            # What this step trained on: with the step number, exactly-once is checkable from
            # metrics.jsonl (non-numbers stay out of TensorBoard and W&B).
            metrics["prompt_indices"] = work.prompt_indices
            metrics.update(
                {
                    "faults/rollout": rollout.faults,
                    "faults/teacher": teacher.faults if teacher is not None else 0,
                    "faults/learner_restarts": learner_restarts,
                }
            )
            log.log(step, metrics)

            # 5. A skipped (non-finite) update left the weights as they were; many in a row
            #    mean the run is broken, and stopping keeps the last good checkpoint intact.
            nonfinite_in_row = nonfinite_in_row + 1 if metrics.get("skipped") else 0
            if nonfinite_in_row >= cfg.trainer.max_nonfinite_in_row:
                raise NumericsError(
                    f"{nonfinite_in_row} non-finite updates in a row (step {step}; "
                    f"trainer.max_nonfinite_in_row={cfg.trainer.max_nonfinite_in_row}); "
                    "the weights are those of the last finite step"
                )

            # 6. Periodic held-out eval and checkpoint; SIGTERM checkpoints and stops here,
            #    unless it came during the last step: then the run finishes (the export costs
            #    about what a stop would, and the checkpoint covers a kill during it).
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                ahead = ready(ahead)
                last_eval = evaluate(step)
            if preemption.requested or (
                cfg.trainer.save_every and step % cfg.trainer.save_every == 0
            ):
                ahead = ready(ahead)
                save(step)
            if preemption.requested and step < cfg.trainer.max_steps:
                print(
                    f"rayd: SIGTERM: checkpoint of step {step} saved in {store.root}; "
                    "run the same command again to resume",
                    file=sys.stderr,
                )
                preempted = True
                break
        else:
            if not cfg.trainer.eval_every or cfg.trainer.max_steps % cfg.trainer.eval_every:
                last_eval = evaluate(cfg.trainer.max_steps)
            export_student(learners, student_path, tokenizer, run_dir / "student")
    finally:
        # No rollout or teacher call may go on behind the driver's back once the pools go.
        rollout_thread.shutdown(wait=True)
        for made in (ahead, next_rollouts):
            if isinstance(made, Future) and made.done() and not made.exception():
                made = made.result()
            if isinstance(made, Pending):
                made.stream.close()
        teacher_thread.shutdown(wait=True)
        log.close()
        for pool in (rollout, teacher):
            if pool is not None:
                pool.shutdown()
        learners.shutdown()
        # Only now: a second SIGTERM during the shutdown must not kill the process half-way.
        preemption.restore()

    summary = {
        "steps": step if preempted else cfg.trainer.max_steps,
        "preempted": preempted,
        "initial": first_eval,
        "final": last_eval,
        "student": str(run_dir / "student"),
        "metrics": str(log.path),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def check_resume_compatible(cfg: RunConfig, state: dict[str, Any]) -> None:
    """DeepSpeed cannot re-shard ZeRO state to another learner count or stage on load."""
    for key, now in (
        ("num_learners", cfg.learner.num_learners),
        ("zero_stage", cfg.learner.zero_stage),
    ):
        if state and state.get(key) != now:
            raise ConfigError(
                f"config error: learner.{key}={now} but the checkpoint to resume was saved with "
                f"{state.get(key)}; keep {state.get(key)} or start a new run under a new name"
            )


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: a resumed run draws the same rollouts as an unbroken one."""
    return random.Random(f"{seed}:rollout:{step}").getrandbits(31)


def to_rng_state(saved: list[Any]) -> tuple[Any, ...]:
    """random.Random state after a JSON round trip (tuples came back as lists)."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def teacher_scores(
    cfg: RunConfig,
    teacher: Teachers | None,
    stored: StoredSignal | None,
    samples: list[Sample],
    features: Sequence[tuple[int, int]] = (),
    prompts: Sequence[Prompt] = (),
) -> tuple[list[TeacherScore], dict[str, float]]:
    """Per sample, the teacher signal on its completion (see rayd.types.TeacherScore), all in
    one call (the loop streams chunks through `ask_teacher` instead); also the per-teacher
    metrics (several teachers only)."""
    scored = None
    if teacher is not None and stored is None:
        asked = [s for s in samples if not s.hard_target]
        scored = ask_teacher(cfg, teacher, asked, features, prompts)
    return teacher_signal(cfg, teacher, stored, samples, scored)


def ask_teacher(
    cfg: RunConfig,
    teacher: Teachers,
    samples: list[Sample],
    features: Sequence[tuple[int, int]] = (),
    prompts: Sequence[Prompt] = (),
) -> Scored:
    """The teacher actors' signal on `samples` (none a hard target): with hidden states of the
    feature_kd layers; with several teachers their combination (`prompts`, indexed by the
    samples' prompt_index, pick routed teachers)."""
    t = cfg.teacher
    pairs = [(s.prompt_ids, s.completion_ids) for s in samples]
    routing = [prompts[s.prompt_index] for s in samples] if t.combine == "route" else []
    if t.support == "teacher_topk":
        extra = {"hidden_layers": [layer for _, layer in features]} if features else {}
        return teacher.score("score", pairs, prompts=routing, top_k=t.top_k, **extra)
    # The student's top-k came with its rollouts (config: every sample is on-policy); the
    # teacher's exact log-probs at them make the top-k losses compare over the student's
    # support.
    ids = [s.student_topk_ids for s in samples]
    if any(i is None for i in ids):
        raise RuntimeError(f"teacher.support={t.support}: a sample came without the student's ids")
    add = t.top_k if t.support == "union" else 0
    return teacher.score("score_ids", pairs, ids, prompts=routing, add_top_k=add)


def teacher_signal(
    cfg: RunConfig,
    teacher: Teachers | None,
    stored: StoredSignal | None,
    samples: list[Sample],
    scored: Scored | None,
) -> tuple[list[TeacherScore], dict[str, float]]:
    """Per sample, its teacher signal: read from a `rayd score` dataset, or what the teacher
    actors said (`scored`, on the samples that are not hard targets, in order); the label
    task's samples (cross-entropy on gold answers) and the teacher-free modes get empty
    scores. Also the per-teacher metrics (several teachers only)."""
    if stored is not None:
        return stored.scores([s.prompt_index for s in samples]), {}
    if teacher is None or scored is None:
        return [TeacherScore.empty(len(s.completion_ids)) for s in samples], {}
    asked = [s for s in samples if not s.hard_target]
    got, stats = scored.scores, teacher.metrics(asked, scored, "teacher/")
    if len(asked) == len(samples):
        return got, stats
    width = got[0].topk_ids.shape[1] if got else cfg.teacher.top_k
    it = iter(got)
    return [
        TeacherScore.empty(len(s.completion_ids), width) if s.hard_target else next(it)
        for s in samples
    ], stats


def drop_truncated(batch: TrainBatch, samples: list[Sample]) -> None:
    """rollout.truncated=drop: completions cut at max_new_tokens leave the loss (and its token
    count); the row stays, since the learners expect a fixed number of rows."""
    for row, sample in enumerate(samples):
        if sample.on_policy and sample.finish_reason == "length":
            batch.loss_mask[row] = False


def split_by_lambda(prompts: list[Prompt], lmbda: float, rng: random.Random):
    """GKD mixing: a prompt goes on-policy with probability lambda, else to its dataset answer."""
    if lmbda >= 1.0:
        return prompts, []
    on, off = [], []
    for p in prompts:
        (on if rng.random() < lmbda or p.completion_ids is None else off).append(p)
    return on, off


def check_offline_data(cfg: RunConfig, prompts: PromptSet) -> None:
    """The offline modes and gkd need a completion per training prompt; step_by_step needs the
    answer and the rationale apart; the label task needs the answer."""
    algo = cfg.algorithm
    where = cfg.data.train_dataset or cfg.data.source
    if algo.label_weight > 0 and any(p.answer is None for p in prompts.train):
        raise ConfigError(
            f"data error: {where}: algorithm.label_weight > 0 trains on gold answers, but some "
            "training rows have no 'answer' (a task, or a dataset with an answer column)"
        )
    if not (algo.offline or algo.lmbda < 1.0):
        return
    if any(p.completion_ids is None for p in prompts.train):
        raise ConfigError(
            f"data error: {where}: algorithm.name={algo.name} trains on completions, but some "
            f"training rows have no {cfg.data.completion_field!r} field (data.completion_field)"
        )
    if algo.name == "step_by_step" and any(
        p.answer is None or p.rationale is None for p in prompts.train
    ):
        raise ConfigError(
            f"data error: {where}: algorithm.name=step_by_step needs 'answer' and 'rationale' "
            "for every training row (rayd generate and the built-in tasks write both)"
        )


def step_by_step_samples(
    prompt: Prompt, algo: AlgorithmConfig, tokenizer: Any, task: Task | None, version: int
) -> list[Sample]:
    """Distilling Step-by-Step's two tasks for one prompt: the plain prompt -> the answer, and
    rationale_prefix + prompt -> the rationale (weighted by rationale_weight). The answer task
    keeps the plain prompt, so evaluation and serving need no task prefix."""
    assert prompt.answer is not None and prompt.rationale is not None
    answer_text = (task or Task.default()).answer_text(prompt.answer)
    prefix = tokenizer(algo.rationale_prefix, add_special_tokens=False).input_ids
    return [
        target_sample(prompt, prompt.ids, answer_text, tokenizer, version, 1.0),
        target_sample(
            prompt, prefix + prompt.ids, prompt.rationale, tokenizer, version, algo.rationale_weight
        ),
    ]


def label_sample(
    prompt: Prompt, algo: AlgorithmConfig, tokenizer: Any, task: Task | None, version: int
) -> Sample:
    """The label task beside on-policy rationale distillation: label_prefix + prompt -> the gold
    answer, cross-entropy weighted label_weight. On the plain prompt the student writes its
    rationale, so the label task needs a prefix of its own (the reverse of step_by_step)."""
    assert prompt.answer is not None
    answer_text = (task or Task.default()).answer_text(prompt.answer)
    prefix = tokenizer(algo.label_prefix, add_special_tokens=False).input_ids
    sample = target_sample(
        prompt, prefix + prompt.ids, answer_text, tokenizer, version, algo.label_weight
    )
    sample.hard_target = True
    return sample


def target_sample(
    prompt: Prompt, ids: list[int], target: str, tokenizer: Any, version: int, weight: float
) -> Sample:
    """A dataset sample: `ids` -> `target` + EOS, trained with weight `weight`."""
    completion = [*tokenizer(target, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return Sample(
        prompt_ids=list(ids),
        completion_ids=completion,
        logprobs=[0.0] * len(completion),
        prompt_index=prompt.index,
        weight_version=version,
        on_policy=False,
        weight=weight,
    )


def per_own_tokens(metrics: dict[str, float]) -> None:
    """The learner divides every metric by all of the step's tokens. With a label task, its CE
    and the distilled rows' reverse KL are turned into means over their own tokens."""
    share = metrics.pop("label_tokens", None)
    if share is None:
        return
    metrics["label_token_fraction"] = share
    metrics["label_loss"] /= max(share, 1e-12)
    if "reverse_kl" in metrics:
        metrics["reverse_kl"] /= max(1.0 - share, 1e-12)


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
    except CheckpointError as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 2
    except (NumericsError, LearnerFailure, cluster.WorkerLost, cluster.RemoteCallTimeout) as exc:
        print(f"rayd: stopped: {exc}", file=sys.stderr)
        return 1

    if summary["preempted"]:
        return 143  # 128 + SIGTERM: not finished; the same command resumes
    print(json.dumps({"initial": summary["initial"], "final": summary["final"]}, indent=2))
    print(f"rayd: student saved to {summary['student']}; metrics in {summary['metrics']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
