"""The training loop, top to bottom: `run_once` holds the loop; `Run` holds what it works on.

One step of the loop:
    prompts -> weight sync to the rollout engines -> student rollouts (vLLM) -> teacher scores
    (top-k log-probs) -> learner step (DeepSpeed ZeRO) -> periodic eval / checkpoint.
With trainer.max_staleness >= 1 the next step's rollouts start as soon as this step's are in,
while the teacher scores this step and the learners train on it (from weights at most that many
versions behind: rayd/pipeline.py).
With rollout.backend=learner the learner ranks sample instead of rollout engines, from the
weights they train: no sync, and no engine actor to start (small students). With the teacher in
them too (teacher.support=full), a synchronous step is one call to each rank (`one_call`).
The offline modes (sft, step_by_step, logit_kd) take the dataset's completions instead of
rollouts; the engines then get new weights only when an eval needs them. logit_kd over a
dataset written by `rayd score` reads the teacher's top-k from it and starts no teacher.
The same code runs under `ray job submit` (it joins that cluster) and on a laptop (it starts a
local Ray). Everything a step needs is visible here; the actors only own their backends.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import ray

from rayd import cluster
from rayd.checkpoint import LEARNER_TAG, CheckpointStore
from rayd.config import ConfigError, RunConfig, save_config
from rayd.data.prompts import PromptSampler, load_prompts, read_rows
from rayd.data.samples import (
    check_offline_data,
    dataset_sample,
    label_sample,
    split_by_lambda,
    step_by_step_samples,
)
from rayd.evaluate import heldout_metrics
from rayd.learner.group import LearnerFailure
from rayd.metrics import MetricsLogger, StageTimer, per_own_tokens, start_trackers, step_metrics
from rayd.pipeline import (
    Draw,
    Pending,
    Prepared,
    TeacherStream,
    check_staleness,
    staleness_metrics,
)
from rayd.progress import stage
from rayd.reward import advantages, rewards
from rayd.rollout.worker import prompt_seeds
from rayd.steps import weigh_steps
from rayd.tasks.base import Task
from rayd.teacher.group import check_routes
from rayd.teacher.signal import ask_teacher, teacher_signal
from rayd.teacher.stored import load_stored_signal
from rayd.types import Sample, TrainBatch, collate, drop_truncated
from rayd.workers import (
    check_engine_parallel,
    check_engine_room,
    check_model_paths,
    check_models,
    check_resources,
    export_student,
    feature_pairs,
    start_workers,
)


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
    """One attempt at the job: set-up, resume (or the first eval), the loop, export."""
    run = Run(cfg, learner_restarts)  # every cheap check first, then the actors
    state, algo = run.state, cfg.algorithm
    lag, last_step = cfg.trainer.max_staleness, cfg.trainer.max_steps
    step = state.step
    preempted = False
    try:
        run.resume_or_evaluate()
        for step in range(state.step + 1, last_step + 1):
            timer = StageTimer()
            step_start = time.perf_counter()

            if run.one_call:
                # 1-4 in one round of calls: the learner ranks sample this step's prompts and
                # train on them, the teacher inside them (`roll_out_and_train`).
                work, metrics = run.roll_out_and_train(run.draw(step), timer)
                step_stats: dict[str, float] = {}
            else:
                # 1-3. This step's prompts, rollouts and teacher signal (`draw`, `roll_out`,
                #      `score`): the rollouts made ahead during the previous step
                #      (max_staleness >= 1), or now from current weights.
                if state.ahead is None:
                    if not algo.offline:
                        with timer("sync"):
                            run.sync_weights()
                    state.ahead = run.roll_out(run.draw(step), run.served)
                if lag > 0 and step < last_step:
                    # The engines are idle: the next step's rollouts start now, beside this
                    # step's teacher scoring and learner step, from weights at most `lag`
                    # versions behind the learner that will train them.
                    if state.version + 1 - run.served > lag:
                        with timer("sync"):
                            run.sync_weights()
                    run.next_rollouts = run.rollout_thread.submit(
                        run.roll_out, run.draw(step + 1), run.served
                    )
                work = run.ready(state.ahead)
                state.ahead = None
                check_staleness(work.samples, state.version, lag)

                # 4. One optimizer step on the learner group (data parallel, ZeRO).
                batch, step_stats = run.batch(work)
                with timer("learner"):
                    metrics = run.learners.train_step(batch)
            state.version += 1
            state.step = step
            if run.next_rollouts is not None:  # its teacher signal is still being scored
                with timer("rollout_wait"):
                    state.ahead, run.next_rollouts = run.next_rollouts.result(), None
            step_time = time.perf_counter() - step_start
            run.log_step(step, work, metrics, step_stats, timer, step_time)

            # 5. A skipped (non-finite) update left the weights as they were; many in a row
            #    mean the run is broken, and stopping keeps the last good checkpoint intact.
            state.nonfinite_in_row = state.nonfinite_in_row + 1 if metrics.get("skipped") else 0
            if state.nonfinite_in_row >= cfg.trainer.max_nonfinite_in_row:
                raise NumericsError(
                    f"{state.nonfinite_in_row} non-finite updates in a row (step {step}; "
                    f"trainer.max_nonfinite_in_row={cfg.trainer.max_nonfinite_in_row}); "
                    "the weights are those of the last finite step"
                )

            # 6. Periodic held-out eval and checkpoint; SIGTERM checkpoints and stops here,
            #    unless it came during the last step: then the run finishes (the export costs
            #    about what a stop would, and the checkpoint covers a kill during it).
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                state.last_eval = run.evaluate(step)
            if run.preemption.requested or (
                cfg.trainer.save_every and step % cfg.trainer.save_every == 0
            ):
                run.save(step)
            if run.preemption.requested and step < last_step:
                print(
                    f"rayd: SIGTERM: checkpoint of step {step} saved in {run.store.root}; "
                    "run the same command again to resume",
                    file=sys.stderr,
                )
                preempted = True
                break
        else:
            if not cfg.trainer.eval_every or last_step % cfg.trainer.eval_every:
                state.last_eval = run.evaluate(last_step)
            run.export()
    finally:
        run.close()

    summary = {
        "steps": step if preempted else last_step,
        "preempted": preempted,
        "initial": state.first_eval,
        "final": state.last_eval,
        "student": str(cfg.run_dir / "student"),
        "metrics": str(run.log.path),
    }
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class NumericsError(RuntimeError):
    """Too many non-finite updates in a row: the run stops rather than corrupt the weights."""


@dataclass
class DriverState:
    """All of the driver that a checkpoint restores: with the learners' own checkpoint, a
    resumed run goes on exactly as the unbroken one would."""

    sampler: PromptSampler  # the training-prompt cursor
    rng: random.Random  # GKD's on/off-policy draws
    step: int = 0  # the last step trained
    version: int = 0  # the learners' weights: one version per step
    nonfinite_in_row: int = 0
    first_eval: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None
    # The next step, made ahead (pipelined). The sampler and RNG have already drawn it, so a
    # checkpoint holds its samples: they came from weights the checkpoint does not hold.
    ahead: Pending | Prepared | None = None

    def to_json(self, cfg: RunConfig) -> dict[str, Any]:
        """The checkpoint's driver state; `ahead` must be scored (`Prepared`) or None. The
        step number is added by the checkpoint store."""
        assert not isinstance(self.ahead, Pending), "score the step made ahead before saving"
        return {
            "version": self.version,
            "sampler": self.sampler.state(),
            "rng": self.rng.getstate(),
            "prefetched": self.ahead.to_state() if self.ahead is not None else None,
            "nonfinite_in_row": self.nonfinite_in_row,
            "first_eval": self.first_eval,
            "last_eval": self.last_eval,
            # DeepSpeed cannot re-shard ZeRO state on load, nor load a LoRA student's state
            # into another set of adapters: `check_resumable` compares these.
            "num_learners": cfg.learner.num_learners,
            "zero_stage": cfg.learner.zero_stage,
            "lora": lora_settings(cfg),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """The state `to_json` saved; `ahead` comes back unscored (its signal is recomputed)."""
        self.sampler.restore(saved["sampler"])
        version, internal, gauss = saved["rng"]  # JSON turned its tuples into lists
        self.rng.setstate((version, tuple(internal), gauss))
        self.step = saved["step"]
        self.version = saved["version"]
        self.nonfinite_in_row = saved["nonfinite_in_row"]
        self.first_eval, self.last_eval = saved["first_eval"], saved["last_eval"]
        prefetched = saved.get("prefetched")
        self.ahead = Prepared.from_state(prefetched) if prefetched else None

    @staticmethod
    def check_resumable(cfg: RunConfig, saved: dict[str, Any]) -> None:
        """DeepSpeed cannot re-shard ZeRO state to another learner count or stage on load, and
        a LoRA student's checkpoint holds its adapters (none for full weights)."""
        for key, now in (
            ("num_learners", cfg.learner.num_learners),
            ("zero_stage", cfg.learner.zero_stage),
            ("lora", lora_settings(cfg)),
        ):
            if saved and saved.get(key) != now:
                raise ConfigError(
                    f"config error: learner.{key}={now} but the checkpoint to resume was saved "
                    f"with {saved.get(key)}; keep {saved.get(key)} or start a new run under a "
                    "new name"
                )


def lora_settings(cfg: RunConfig) -> dict[str, Any] | None:
    """learner.lora as a checkpoint keeps it (checkpoints without the key are full-weight)."""
    return cfg.learner.lora.model_dump() if cfg.learner.lora is not None else None


class Run:
    """One attempt at a job: its checked inputs, the three roles' actors, the driver's state,
    and the loop's stages as methods (draw, roll_out, score, batch, evaluate, save)."""

    def __init__(self, cfg: RunConfig, learner_restarts: int = 0) -> None:
        # Everything that can be wrong is checked before any actor starts.
        self.cfg = cfg
        self.learner_restarts = learner_restarts
        run_dir = cfg.run_dir
        self.store = CheckpointStore(run_dir / "checkpoints", cfg.trainer.keep_checkpoints)
        self.resume_from = self.store.select(cfg.trainer.resume)
        self.saved = self.resume_from.driver_state() if self.resume_from else {}
        DriverState.check_resumable(cfg, self.saved)
        save_config(cfg, run_dir / "config.yaml")
        # The data files are read and checked before any model is resolved: check_models
        # builds a tiny:<preset> model that is not cached yet, which can take minutes.
        check_model_paths(cfg)
        rows = read_rows(cfg.data, cfg.trainer.seed, route_field=cfg.teacher.route_field)
        check_offline_data(cfg, rows.unencoded())
        check_routes(cfg, rows.unencoded())
        self.student_path, teacher_paths, self.tokenizer = check_models(cfg)
        check_engine_parallel(cfg, self.student_path, teacher_paths)
        # feature_kd and stored signal take one teacher (the config refuses several for them)
        teacher_path = teacher_paths[0] if teacher_paths else None
        self.features = feature_pairs(cfg, self.student_path, teacher_path)  # else []
        self.prompts = load_prompts(
            cfg.data,
            self.tokenizer,
            cfg.rollout.max_model_len - cfg.rollout.max_new_tokens,
            cfg.trainer.seed,
            route_field=cfg.teacher.route_field,
            rows=rows,
        )
        check_offline_data(cfg, self.prompts)  # again: long prompts may have been dropped
        check_routes(cfg, self.prompts)
        # logit_kd over a `rayd score` dataset reads the teacher's top-k from disk: no teacher.
        self.stored = load_stored_signal(cfg, self.prompts, teacher_path, self.tokenizer)
        # teacher.support=full: the learners run the teacher (the eval asks learner rank 0 too).
        self.in_learners = cfg.teacher.support == "full"
        if self.stored is not None and self.in_learners:
            raise ConfigError(
                "config error: teacher.support=full runs the teacher inside the learners, but "
                "the dataset carries a stored top-k signal (rayd score): drop one of the two"
            )
        trackers = start_trackers(run_dir, cfg)  # W&B when enabled: after the checks
        cluster.connect()
        teacher_actors = self.stored is None and not self.in_learners
        check_resources(cfg, ray.cluster_resources(), with_teacher=teacher_actors)
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        check_engine_room(cfg, nodes, with_teacher=teacher_actors)
        # One actor pool per teacher; several are combined per teacher.combine.
        with stage("starting the rollout, teacher and learner actors"):
            self.rollout, self.teacher, self.learners = start_workers(
                cfg,
                self.student_path,
                teacher_paths if self.stored is None else None,
                self.features,
                vocab_size=len(self.tokenizer),
            )
        self.state = DriverState(
            PromptSampler(len(self.prompts.train), cfg.trainer.seed),
            random.Random(cfg.trainer.seed),
        )
        self.log = MetricsLogger(
            run_dir,
            cfg.logging,
            cfg.trainer.max_steps,
            start_step=self.saved.get("step", 0),
            trackers=trackers,
        )
        self.served = 0  # the weight version the rollout engines hold
        # A step is one round of calls when the learner ranks sample (rollout.backend=learner)
        # and hold the teacher, the loop is synchronous, and the driver has nothing to add
        # between the samples and the update (a label task, rewards, step weights).
        algo = cfg.algorithm
        self.one_call = (
            cfg.rollout.backend == "learner"
            and cfg.trainer.max_staleness == 0
            and self.in_learners
            and algo.label_weight == 0
            and algo.reward_weight == 0
            and algo.step_weighting == "none"
        )
        # max_staleness >= 1: the next step's rollouts are made on `rollout_thread` while the
        # teacher scores this step's and the learners train on it.
        self.rollout_thread = ThreadPoolExecutor(1, thread_name_prefix="rayd-rollout")
        # Every teacher call of the run's streams, in order, on one thread (see TeacherStream).
        self.teacher_thread = ThreadPoolExecutor(1, thread_name_prefix="rayd-teacher")
        self.next_rollouts: Future[Pending] | None = None
        self.preemption = Preemption()

    # --- Start: a resumed run's state, or a fresh run's first eval --------------------------

    def resume_or_evaluate(self) -> None:
        state = self.state
        if self.resume_from is None:
            state.first_eval = state.last_eval = self.evaluate(0)
            return
        # Learners restore weights, optimizer/ZeRO state and LR schedule; the driver its cursor
        # and RNG; then the engines (which started from the initial student) get the restored
        # weights before they serve a single rollout.
        self.learners.load_checkpoint(self.resume_from.learner_dir, LEARNER_TAG)
        state.restore(self.saved)
        self.sync_weights()
        if isinstance(state.ahead, Prepared):  # rollouts from older weights: not redone
            restored = state.ahead
            state.ahead = self.score(
                Pending(
                    restored.step, self.teacher_stream(restored.chunks), restored.prompt_indices
                )
            )
        print(f"rayd: resumed from {self.resume_from.path} (step {state.step})", file=sys.stderr)

    # --- The stages of a step ---------------------------------------------------------------

    def draw(self, step: int) -> Draw:
        """Step 1 of `step`, on the driver's thread (the sampler, RNG and tokenizer are used
        only here): its prompts, which of them go to the student, and the samples that need no
        rollout (dataset completions, step-by-step and label-task samples)."""
        cfg, algo, prompts, tokenizer = self.cfg, self.cfg.algorithm, self.prompts, self.tokenizer
        trains_at = step - 1  # the learner version that trains this step (dataset samples')
        drawn = self.state.sampler.next(cfg.trainer.prompts_per_step)
        batch_prompts = [prompts.train[i] for i in drawn]
        # GKD's lambda sends a share of prompts to the dataset's own completions instead
        # (off-policy); on_policy keeps lambda = 1; the offline modes take the dataset's
        # completions only.
        if algo.offline:
            on_policy, off_policy = [], batch_prompts
        else:
            on_policy, off_policy = split_by_lambda(batch_prompts, algo.lmbda, self.state.rng)
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

    def roll_out(self, work: Draw, engine_version: int) -> Pending:
        """Step 2: the student's rollouts of `work`'s prompts from the weights the engines
        hold (`engine_version`). Each rollout worker's chunk goes to the teacher as soon as it
        arrives; the teacher is still scoring when this returns. Runs on the driver's thread,
        or on the rollout thread while the learners train (the pipelined loop)."""
        r = self.cfg.rollout
        timer = StageTimer()
        stream = self.teacher_stream()
        with timer("rollout"), stream.cancel_on_error():
            indices = [p.index for p in work.on_policy]
            arriving = self.rollout.map_chunks_as_completed(
                "generate",
                [p.ids for p in work.on_policy],
                indices,
                # Over the whole batch: a prompt drawn twice draws apart on any two workers.
                prompt_seeds(rollout_seed(self.cfg.trainer.seed, work.step), indices),
                n=r.n,
                temperature=r.temperature,
                top_p=r.top_p,
                max_new_tokens=r.max_new_tokens,
                expect_version=engine_version,
                return_topk=self.cfg.student_topk,  # teacher.support: the student's ids
            )
            for key, chunk in arriving:  # none without on-policy prompts
                stream.add(key, chunk)
        if work.extra:
            stream.add(len(self.rollout), work.extra)
        return Pending(work.step, stream, work.prompt_indices, timer)

    def score(self, pending: Pending) -> Prepared:
        """Step 3: the teacher signal on every completion token: its log-prob and its
        log-probs over the support (its top-k, or the student's: teacher.support), from the
        teacher actors or stored with the dataset. Several teachers: their mixture, or each
        sample's routed teacher. sft / step_by_step: no teacher signal."""
        timer = pending.timer
        with timer("teacher"):
            chunks, scored = pending.stream.finish()
            samples = [s for chunk in chunks for s in chunk]
            scores, teacher_stats = teacher_signal(
                self.cfg, self.teacher, self.stored, samples, scored
            )
        seconds = timer.seconds
        if not self.teacher_actors and self.stored is None:  # no teacher stage to report
            seconds.pop("teacher", None)
        return Prepared(
            pending.step, chunks, pending.prompt_indices, scores, teacher_stats, seconds
        )

    def roll_out_and_train(self, work: Draw, timer: StageTimer) -> tuple[Prepared, dict[str, Any]]:
        """Steps 2-4 in one call to each learner rank (`one_call`): the ranks sample `work`'s
        prompts with their current weights, as `roll_out` would have them, and train on the
        batch `batch` would have built of the samples. The step's samples and its metrics; the
        timer gets rank 0's sampling time as the rollout stage, the rest of the call as the
        learner stage."""
        r, state = self.cfg.rollout, self.state
        if work.extra:  # `one_call` rules out every kind of row that is not a rollout
            raise RuntimeError(f"step {work.step}: rows without a rollout in a one-call step")
        indices = [p.index for p in work.on_policy]
        start = time.perf_counter()
        chunks, metrics = self.learners.roll_out_and_train(
            [p.ids for p in work.on_policy],
            indices,
            prompt_seeds(rollout_seed(self.cfg.trainer.seed, work.step), indices),
            pad_id=self.tokenizer.pad_token_id,
            truncated=r.truncated,
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens=r.max_new_tokens,
            expect_version=state.version,
        )
        rollout_s = metrics.pop("rollout_s")
        timer.seconds.update(rollout=rollout_s, learner=time.perf_counter() - start - rollout_s)
        done = Prepared(work.step, chunks, work.prompt_indices)
        check_staleness(done.samples, state.version, 0)
        return done, metrics

    def ready(self, ahead: Pending | Prepared | None) -> Prepared | None:
        """The step made ahead with its teacher signal in."""
        return self.score(ahead) if isinstance(ahead, Pending) else ahead

    def batch(self, work: Prepared) -> tuple[TrainBatch, dict[str, float]]:
        """Step 4's input: the padded batch. Step weighting shares each rationale's loss among
        its reasoning steps (rayd/steps.py); rows from older weights are marked stale
        (importance weights in the loss)."""
        cfg, algo = self.cfg, self.cfg.algorithm
        batch = collate(
            work.samples,
            work.scores,
            self.tokenizer.pad_token_id,
            learner_version=self.state.version,
        )
        if cfg.rollout.truncated == "drop":
            drop_truncated(batch, work.samples)
        step_stats: dict[str, float] = {}
        if algo.reward_weight > 0:  # the verifier's reward beside distillation
            scores = rewards(work.samples, self.prompts, self.prompts.task)
            batch.advantage = advantages(work.samples, scores, per_prompt=cfg.rollout.n > 1)
            rewarded = [r for r in scores if r is not None]
            if rewarded:
                step_stats["reward"] = sum(rewarded) / len(rewarded)
        if algo.step_weighting != "none":
            marker = (self.prompts.task or Task.default()).marker
            batch.token_weight, weighting = weigh_steps(
                batch, work.samples, self.tokenizer, algo, marker
            )
            step_stats.update(weighting)
        return batch, step_stats

    def log_step(
        self,
        step: int,
        work: Prepared,
        metrics: dict[str, Any],
        step_stats: dict[str, float],
        timer: StageTimer,
        step_time: float,
    ) -> None:
        """The step's line in metrics.jsonl (and TensorBoard, W&B, the progress bar)."""
        samples = work.samples
        tokens = sum(len(s.completion_ids) for s in samples)
        if self.teacher is None and self.stored is None:  # no teacher scores: meaningless
            metrics.pop("reverse_kl", None)
        per_own_tokens(metrics)
        metrics.update(step_stats)
        metrics.update(work.teacher_stats)
        seconds = {**work.seconds, **timer.seconds}
        metrics.update(step_metrics(samples, tokens, seconds, step_time, self.state.version))
        metrics.update(staleness_metrics(samples, self.state.version - 1))
        # What this step trained on: with the step number, exactly-once is checkable from
        # metrics.jsonl (non-numbers stay out of TensorBoard and W&B).
        metrics["prompt_indices"] = work.prompt_indices
        metrics["faults/rollout"] = self.rollout.faults
        metrics["faults/teacher"] = self.teacher.faults if self.teacher is not None else 0
        metrics["faults/learner_restarts"] = self.learner_restarts
        self.log.log(step, metrics)

    # --- Weights, eval, checkpoint, export ---------------------------------------------------

    def sync_weights(self) -> None:
        """New weights to every rollout engine (if they lag); the driver holds a reference.
        rollout.backend=learner: the learners sample with the weights they train, and a
        sample's version says so (their own step count), so nothing moves."""
        version = self.state.version
        if self.served == version:
            return
        if self.cfg.rollout.backend == "learner":
            self.served = version
            return
        weights = self.learners.publish_weights()
        self.rollout.remember("load_weights", weights, version)  # for a restarted engine
        self.rollout.call_all("load_weights", weights, version)
        self.served = version

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics of the current weights. The eval uses the teacher and the engines,
        which a step made ahead must not share: its teacher signal is finished first."""
        self.state.ahead = self.ready(self.state.ahead)
        self.sync_weights()
        prompts = self.prompts
        metrics = heldout_metrics(
            self.rollout, self.teacher, prompts.eval, prompts.task, self.cfg, self.state.version
        )
        self.log.log(step, metrics, advance=False)
        return metrics

    def save(self, step: int) -> None:
        state = self.state
        state.ahead = self.ready(state.ahead)  # its samples go into the checkpoint
        if self.cfg.trainer.max_staleness > 0:
            # The resumed run's engines start from the checkpoint's weights; the unbroken run's
            # must hold the same from here on, or their next rollouts would differ.
            self.sync_weights()
        staging = self.store.staging_dir(step)
        self.learners.save_checkpoint(str(staging / "learner"), LEARNER_TAG, {"step": step})
        self.store.commit(staging, step, state.to_json(self.cfg))

    def export(self) -> None:
        export_student(
            self.learners, self.student_path, self.tokenizer, self.cfg.run_dir / "student"
        )

    # --- Plumbing -----------------------------------------------------------------------------

    @property
    def teacher_actors(self) -> bool:
        """Whether teacher actors score the rollouts (not a stored signal, not the learners)."""
        return self.teacher is not None and self.stored is None and not self.in_learners

    def teacher_stream(self, chunks: Sequence[list[Sample]] = ()) -> TeacherStream:
        """A stream to the teacher actors (none for a stored signal, no teacher, or a teacher
        inside the learners), fed with `chunks` if given (a restored prefetched step's)."""
        ask = None
        if self.teacher_actors:
            ask = partial(
                ask_teacher,
                self.cfg,
                self.teacher,
                features=self.features,
                prompts=self.prompts.train,
            )
        stream = TeacherStream(ask, self.teacher_thread)
        for key, chunk in enumerate(chunks):
            stream.add(key, chunk)
        return stream

    def close(self) -> None:
        # No rollout or teacher call may go on behind the driver's back once the pools go.
        self.rollout_thread.shutdown(wait=True)
        for made in (self.state.ahead, self.next_rollouts):
            if isinstance(made, Future) and made.done() and not made.exception():
                made = made.result()
            if isinstance(made, Pending):
                made.stream.close()
        self.teacher_thread.shutdown(wait=True)
        self.log.close()
        for pool in (self.rollout, self.teacher):
            if pool is not None:
                pool.shutdown()
        self.learners.shutdown()
        # Only now: a second SIGTERM during the shutdown must not kill the process half-way.
        self.preemption.restore()


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


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: a resumed run draws the same rollouts as an unbroken one."""
    return random.Random(f"{seed}:rollout:{step}").getrandbits(31)
