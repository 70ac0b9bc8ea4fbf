"""The training loop, top to bottom: `run_once` holds the loop; `Run` holds what it works on.

One step of the loop:
    prompts -> weight sync to the rollout engines -> student rollouts (vLLM) -> teacher scores
    (top-k log-probs) -> learner step (DeepSpeed ZeRO) -> periodic eval / checkpoint.
How steps 1-4 are made is the run's step mode, chosen once (`step_mode`); the loop reads the
same in every mode:
- `Synchronous`: each step from the current weights, one stage after the other;
- `Offline` (sft, step_by_step, logit_kd, feature_kd): the dataset's completions instead of
  rollouts; the engines get new weights only when an eval needs them;
- `Pipelined` (trainer.max_staleness >= 1): the next step's rollouts start as soon as this
  step's are in, while the teacher scores this step and the learners train on it (from weights
  at most that many versions behind: rayd/pipeline.py);
- `OneCall`: the learner ranks sample (rollout.backend=learner, from the weights they train:
  no sync, no engine actor) and hold the teacher (teacher.support=full), so a synchronous step
  is one call to each rank.
The teacher signal comes from one source, also chosen once (rayd/teacher/signal.py): teacher
actors, a dataset written by `rayd score`, the learners themselves, or none.
The same code runs under `ray job submit` (it joins that cluster) and on a laptop (it starts a
local Ray). Everything a step needs is visible here; the actors only own their backends.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from rayd import cluster
from rayd.checkpoint import LEARNER_TAG, CheckpointStore, learner_rank_files
from rayd.config import RunConfig, save_config
from rayd.data.prompts import PromptSampler
from rayd.data.samples import dataset_sample, label_sample, split_by_lambda, step_by_step_samples
from rayd.evaluate import eval_sample_seed, heldout_metrics
from rayd.fingerprint import check_resume, fingerprint
from rayd.learner.group import LearnerFailure
from rayd.metrics import (
    MetricsLogger,
    SamplesLog,
    StageTimer,
    per_own_tokens,
    position_weight_means,
    start_trackers,
    step_metrics,
)
from rayd.pipeline import (
    Draw,
    Pending,
    Prepared,
    TeacherStream,
    Trained,
    check_staleness,
    staleness_metrics,
)
from rayd.preflight import check_cluster, preflight
from rayd.progress import stage
from rayd.reward import advantages, rewards
from rayd.run_folder import locked_folder
from rayd.sampling import RolloutRequest, prompt_seeds, rollout_seed
from rayd.staging import staged_folder
from rayd.state import DriverState
from rayd.steps import weigh_steps
from rayd.tasks.base import Task
from rayd.teacher.group import Teachers
from rayd.teacher.privileged import PrivilegedContext
from rayd.teacher.server_scorer import record_or_check_served_model
from rayd.teacher.signal import TeacherSignal, TeacherSource
from rayd.types import Sample, TrainBatch, training_batch
from rayd.weight_sync import WeightStream
from rayd.workers import export_student, start_workers


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole job; returns the final metrics (also written to the run folder).

    A learner that dies takes the DeepSpeed group with it (a collective cannot lose a rank):
    every actor is then rebuilt and the run resumes from its last checkpoint, at most
    `trainer.learner_restarts` times. Rollout and teacher actors recover in place (WorkerPool).
    """
    with locked_folder(cfg.run_dir):  # one process in a run folder: a second is refused
        return _train(cfg)


def _train(cfg: RunConfig) -> dict[str, Any]:
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
    state, last_step = run.state, cfg.trainer.max_steps
    step = state.step
    preempted = False
    try:
        run.resume_or_evaluate()
        for step in range(state.step + 1, last_step + 1):
            timer = StageTimer()
            step_start = time.perf_counter()

            # 1-4. This step's prompts, rollouts, teacher signal and learner update, made as
            #      the run's step mode makes them (synchronous, offline, pipelined, one call).
            done = run.steps.take(step, timer)
            state.version += 1
            state.step = step
            run.log_step(step, done, timer, time.perf_counter() - step_start)

            # 5. A skipped (non-finite) update left the weights as they were; many in a row
            #    mean the run is broken, and stopping keeps the last good checkpoint intact.
            skipped = done.metrics.get("skipped")
            state.nonfinite_in_row = state.nonfinite_in_row + 1 if skipped else 0
            if state.nonfinite_in_row >= cfg.trainer.max_nonfinite_in_row:
                raise NumericsError(
                    f"{state.nonfinite_in_row} non-finite updates in a row (step {step}; "
                    f"trainer.max_nonfinite_in_row={cfg.trainer.max_nonfinite_in_row}); "
                    "the weights are those of the last finite step"
                )

            # 6. Periodic held-out eval and checkpoint; SIGTERM or Ctrl-C checkpoints and stops
            #    here, unless it came during the last step: then the run finishes (the export
            #    costs about what a stop would, and the checkpoint covers a kill during it).
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                state.last_eval = run.evaluate(step)
            if run.preemption.requested or (
                cfg.trainer.save_every and step % cfg.trainer.save_every == 0
            ):
                run.save(step)
            if run.preemption.requested and step < last_step:
                print(
                    f"rayd: {run.preemption.requested}: checkpoint of step {step} saved in "
                    f"{run.store.root}; run the same command again to resume",
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
        "stopped_by": run.preemption.requested if preempted else None,  # SIGTERM or SIGINT
        "initial": state.first_eval,
        "final": state.last_eval,
        "student": str(cfg.run_dir / "student"),
        "metrics": str(run.log.path),
    }
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class NumericsError(RuntimeError):
    """Too many non-finite updates in a row: the run stops rather than corrupt the weights."""


# --- How steps 1-4 are made: one mode per run ---------------------------------------------


class Synchronous:
    """Each step from the current weights: sync, draw, roll out, score, train, in turn.

    A step made ahead (`DriverState.ahead`: a pipelined run's checkpoint holds one) is taken
    as it is; only `Pipelined` makes new ones. `settle` finishes its teacher signal (the eval
    and a checkpoint need the engines and the teacher to themselves)."""

    syncs_weights = True  # the engines get the learners' weights before every rollout
    lag = 0  # how many versions behind the learner a step's rollouts may be

    def __init__(self, run: Run) -> None:
        self.run = run

    def take(self, step: int, timer: StageTimer) -> Trained:
        run, state = self.run, self.run.state
        if state.ahead is None:
            if self.syncs_weights:
                with timer("sync"):
                    run.sync_weights()
            state.ahead = run.roll_out(run.draw(step), run.served)
        self.start_next(step, timer)
        work = run.ready(state.ahead)
        state.ahead = None
        check_staleness(work.samples, state.version, self.lag)
        # 4. One optimizer step on the learner group (data parallel, ZeRO).
        batch, stats = run.batch(work)
        with timer("learner"):
            metrics = run.learners.train_step(batch)
        self.finish_next(timer)
        return Trained(work, metrics, stats)

    def start_next(self, step: int, timer: StageTimer) -> None:
        """Start making step + 1 while this one trains (`Pipelined`)."""

    def finish_next(self, timer: StageTimer) -> None:
        """Wait for step + 1's rollouts; they become `DriverState.ahead` (`Pipelined`)."""

    def settle(self) -> None:
        """The step made ahead, if any, with its teacher signal in."""
        self.run.state.ahead = self.run.ready(self.run.state.ahead)

    def before_save(self) -> None:
        """What a checkpoint needs first: the step made ahead settled (its samples go in)."""
        self.settle()

    def close(self) -> None:
        """No call of the mode's own may go on behind the driver's back."""


class Offline(Synchronous):
    """The dataset's completions, no rollouts: the engines get new weights only for an eval."""

    syncs_weights = False


class Pipelined(Synchronous):
    """trainer.max_staleness >= 1: the next step's rollouts are made on a thread of their own
    while the teacher scores this step's and the learners train on it."""

    def __init__(self, run: Run) -> None:
        super().__init__(run)
        self.lag = run.cfg.trainer.max_staleness
        self.last_step = run.cfg.trainer.max_steps
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="rayd-rollout")
        self.next: Future[Pending] | None = None

    def start_next(self, step: int, timer: StageTimer) -> None:
        if step >= self.last_step:
            return
        # The engines are idle: the next step's rollouts start now, beside this step's
        # teacher scoring and learner step, from weights at most `lag` versions behind the
        # learner that will train them.
        run = self.run
        if run.state.version + 1 - run.served > self.lag:
            with timer("sync"):
                run.sync_weights()
        self.next = self.thread.submit(run.roll_out, run.draw(step + 1), run.served)

    def finish_next(self, timer: StageTimer) -> None:
        if self.next is not None:  # its teacher signal is still being scored
            with timer("rollout_wait"):
                self.run.state.ahead, self.next = self.next.result(), None

    def before_save(self) -> None:
        super().before_save()
        # The resumed run's engines start from the checkpoint's weights; the unbroken run's
        # must hold the same from here on, or their next rollouts would differ.
        self.run.sync_weights()

    def close(self) -> None:
        self.thread.shutdown(wait=True)
        made = self.next
        if made is not None and not made.exception():
            made.result().stream.close()


class OneCall(Synchronous):
    """Steps 2-4 in one call to each learner rank (`Run.roll_out_and_train`): the ranks sample
    this step's prompts with the weights they train, and train on them, the teacher inside."""

    def take(self, step: int, timer: StageTimer) -> Trained:
        if self.run.state.ahead is not None:  # a checkpoint's step made ahead, by another mode
            return super().take(step, timer)
        work, metrics = self.run.roll_out_and_train(self.run.draw(step), timer)
        return Trained(work, metrics, {})


def step_mode(cfg: RunConfig, teacher: TeacherSource) -> type[Synchronous]:
    """The run's step mode. One call a step needs the learners to sample and to hold the
    teacher, a synchronous loop, and nothing for the driver to add between the samples and
    the update (a label task's rows, rewards, step weights, privileged context)."""
    algo = cfg.algorithm
    if cfg.trainer.max_staleness > 0:
        return Pipelined
    if algo.offline:
        return Offline
    driver_adds = (
        algo.label_weight > 0
        or algo.reward_weight > 0
        or algo.step_weighting != "none"
        or cfg.teacher.privileged_context != "none"  # each sample's teacher prompt
    )
    if cfg.rollout.backend == "learner" and teacher == "learners" and not driver_adds:
        return OneCall
    return Synchronous


# --- What a run works on ----------------------------------------------------------------------


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
        DriverState.check_resumable(cfg.learner, self.saved)
        checked = preflight(cfg)
        self.student_path, self.tokenizer = checked.student_path, checked.tokenizer
        self.prompts = checked.prompts
        # What the checkpoints record; a resume must be of the same config and data.
        self.fingerprint = fingerprint(cfg, self.prompts.train, self.prompts.eval)
        if self.resume_from is not None:
            unchecked = check_resume(
                self.saved, self.fingerprint, cfg.trainer.allow_changes, str(self.resume_from.path)
            )
            if unchecked:
                print(unchecked, file=sys.stderr)
        trackers = start_trackers(run_dir, cfg)  # W&B when enabled: after the checks
        cluster.connect()
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        check_cluster(cfg, checked, ray.cluster_resources(), nodes)
        with stage("starting the rollout, teacher and learner actors"):
            self.rollout, teacher, self.learners = start_workers(cfg, checked)
        # Only now, every check passed: a rerun that fails them leaves the folder as it was
        # (`rayd eval` and `rayd export` rebuild the model from this file).
        save_config(cfg, run_dir / "config.yaml")
        if checked.served:  # the served model's name, checked on every later start
            record_or_check_served_model(run_dir, checked.served, cfg.teacher.served_model)
        self.teacher = TeacherSignal(
            checked.teacher,
            cfg.teacher,
            teacher,
            checked.stored,
            checked.features,
            self.prompts.train,
        )
        self.state = DriverState(
            PromptSampler(len(self.prompts.train), cfg.trainer.seed),
            random.Random(cfg.trainer.seed),
        )
        start_step = self.saved.get("step", 0)
        self.log = MetricsLogger(
            run_dir, cfg.logging, cfg.trainer.max_steps, start_step=start_step, trackers=trackers
        )
        self.samples_log = (
            SamplesLog(run_dir, cfg.logging.samples, start_step)
            if cfg.logging.samples != "off"
            else None
        )
        self.served = 0  # the weight version the rollout engines hold
        # sync.method=stream: the weights go from learner rank 0 to the engines in buckets, and
        # no copy is kept between syncs. An engine Ray restarts mid-rollout hands its calls to
        # another until the next sync streams to it too; a lone one gets a blob built then (the
        # learners are idle and at its version: synchronous runs only, see _check_sync).
        self.weight_stream: WeightStream | None = None
        if cfg.rollout.backend != "learner" and cfg.sync.streams(
            cfg.rollout.backend, cfg.trainer.max_staleness, len(self.rollout)
        ):
            ranks = cfg.rollout.tensor_parallel_size * cfg.rollout.pipeline_parallel_size
            self.weight_stream = WeightStream(
                self.learners, self.rollout, cfg.sync, [ranks] * len(self.rollout)
            )
            if len(self.rollout) > 1:
                self.rollout.reroute = True
            else:
                self.rollout.remember_lazy(
                    "load_weights", lambda: (self.learners.publish_weights(), self.state.version)
                )
        # models.teacher: self with teacher actors, weights live or ema: they get the
        # learners' weights every teacher.sync_every versions (the version they hold here).
        self.teacher_syncs = (
            cfg.models.self_taught
            and cfg.teacher.weights != "frozen"
            and checked.teacher == "actors"
        )
        self.teacher_served = 0
        # teacher.privileged_context: every sample's teacher prompt, set as it arrives.
        shown = dict(
            chat_template=cfg.data.chat_template == "auto",
            completion_room=cfg.rollout.max_new_tokens,
        )
        task = self.prompts.task
        self.privileged = PrivilegedContext.of(
            cfg.teacher, self.prompts.train, task, self.tokenizer, **shown
        )
        # feedback: the eval's samples are shown their own correct siblings too
        self.eval_feedback = None
        if cfg.teacher.privileged_context == "feedback":
            self.eval_feedback = PrivilegedContext.of(
                cfg.teacher, self.prompts.eval, task, self.tokenizer, **shown
            )
        self.sampling = cfg.rollout.sampling(cfg.student_topk)  # teacher.support: student ids
        # Every teacher call of the run's streams, in order, on one thread (see TeacherStream).
        self.teacher_thread = ThreadPoolExecutor(1, thread_name_prefix="rayd-teacher")
        self.steps = step_mode(cfg, checked.teacher)(self)
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
        self.sync_teacher(force=True)
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

    def rollout_request(self, work: Draw, version: int) -> RolloutRequest:
        """`work`'s on-policy prompts as one sampling request, to be served by weights of
        `version`, whoever samples them (rollout engines, or the learner ranks)."""
        indices = [p.index for p in work.on_policy]
        return RolloutRequest(
            [p.ids for p in work.on_policy],
            indices,
            # Over the whole batch: a prompt drawn twice draws apart on any two workers.
            prompt_seeds(rollout_seed(self.cfg.trainer.seed, work.step), indices),
            self.sampling,
            version,
        )

    def roll_out(self, work: Draw, engine_version: int) -> Pending:
        """Step 2: the student's rollouts of `work`'s prompts from the weights the engines
        hold (`engine_version`). Each rollout worker's chunk goes to the teacher as soon as it
        arrives; the teacher is still scoring when this returns. Runs on the driver's thread,
        or on the rollout thread while the learners train (the pipelined loop)."""
        timer = StageTimer()
        stream = self.teacher_stream()
        request = self.rollout_request(work, engine_version)
        with timer("rollout"), stream.cancel_on_error():
            arriving = self.rollout.map_chunks_as_completed(
                "generate",
                request.prompts,
                request.prompt_indices,
                request.seeds,
                sampling=request.sampling,
                expect_version=request.expect_version,
            )
            for key, chunk in arriving:  # none without on-policy prompts
                if self.privileged is not None:
                    self.privileged.attach(chunk)
                stream.add(key, chunk)
        if work.extra:
            if self.privileged is not None:
                self.privileged.attach(work.extra)
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
            scores, teacher_stats = self.teacher.signal(samples, scored)
        seconds = timer.seconds
        if not self.teacher.has_stage:
            seconds.pop("teacher", None)
        return Prepared(
            pending.step, chunks, pending.prompt_indices, scores, teacher_stats, seconds
        )

    def roll_out_and_train(self, work: Draw, timer: StageTimer) -> tuple[Prepared, dict[str, Any]]:
        """Steps 2-4 in one call to each learner rank (`OneCall`): the ranks sample `work`'s
        prompts with their current weights, as `roll_out` would have them, and train on the
        batch `batch` would have built of the samples. The step's samples and its metrics; the
        timer gets rank 0's sampling time as the rollout stage, the rest of the call as the
        learner stage."""
        state = self.state
        if work.extra:  # `step_mode` rules out every kind of row that is not a rollout
            raise RuntimeError(f"step {work.step}: rows without a rollout in a one-call step")
        start = time.perf_counter()
        chunks, metrics = self.learners.roll_out_and_train(
            self.rollout_request(work, state.version),
            pad_id=self.tokenizer.pad_token_id,
            drop_truncated=self.cfg.rollout.truncated == "drop",
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
        batch = training_batch(
            work.samples,
            work.scores,
            self.tokenizer.pad_token_id,
            self.state.version,
            drop_truncated=cfg.rollout.truncated == "drop",
            teacher_inputs=self.teacher.source == "learners",  # privileged prompts go along
        )
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

    def log_step(self, step: int, done: Trained, timer: StageTimer, step_time: float) -> None:
        """The step's line in metrics.jsonl (and TensorBoard, W&B, the progress bar), and its
        samples in samples.jsonl when logging.samples asks for them."""
        work, metrics = done.work, done.metrics
        samples = work.samples
        tokens = sum(len(s.completion_ids) for s in samples)
        if not self.teacher.has_signal:  # no teacher scores: meaningless
            metrics.pop("reverse_kl", None)
        per_own_tokens(metrics)
        position_weight_means(metrics)
        metrics.update(done.stats)
        metrics.update(work.teacher_stats)
        seconds = {**work.seconds, **timer.seconds}
        metrics.update(step_metrics(samples, tokens, seconds, step_time, self.state.version))
        metrics.update(staleness_metrics(samples, self.state.version - 1))
        if self.cfg.teacher.privileged_context == "feedback":  # samples without a signal
            unscored = sum(s.unscored for s in samples)
            metrics["privileged/unscored_fraction"] = unscored / len(samples)
        # What this step trained on: with the step number, exactly-once is checkable from
        # metrics.jsonl (non-numbers stay out of TensorBoard and W&B).
        metrics["prompt_indices"] = work.prompt_indices
        metrics["faults/rollout"] = self.rollout.faults
        if self.weight_stream is not None:  # this step's streamed sync: bytes, buckets, seconds
            metrics.update(self.weight_stream.last)
            self.weight_stream.last = {}
        metrics["faults/teacher"] = self.teacher.faults
        metrics["faults/learner_restarts"] = self.learner_restarts
        self.log.log(step, metrics)
        if self.samples_log is not None:
            self.samples_log.log(step, samples, work.scores if self.teacher.has_stage else None)

    # --- Weights, eval, checkpoint, export ---------------------------------------------------

    def sync_weights(self) -> None:
        """New weights to every rollout engine (if they lag); the driver holds a reference.
        rollout.backend=learner: the learners sample with the weights they train, and a
        sample's version says so (their own step count), so nothing moves."""
        self.sync_teacher()
        version = self.state.version
        if self.served == version and not self.rollout.unserved:
            return
        if self.cfg.rollout.backend == "learner":
            self.served = version
            return
        if self.weight_stream is not None:
            self.weight_stream.sync(version)
            self.served = version
            return
        weights = self.learners.publish_weights()
        self.rollout.remember("load_weights", weights, version)  # for a restarted engine
        self.rollout.call_all("load_weights", weights, version)
        self.served = version

    def sync_teacher(self, force: bool = False) -> None:
        """models.teacher: self with teacher actors (weights live or ema): the learners' current
        or EMA weights to the teacher engines at every teacher.sync_every-th version, and
        whenever a checkpoint is saved or restored (`force`), so a resumed run's engines hold
        what the unbroken run's do. On the teacher thread, after the calls already queued
        there: the pools are that thread's."""
        version = self.state.version
        if not self.teacher_syncs or self.teacher_served == version:
            return
        if not force and version % self.cfg.teacher.sync_every:
            return
        weights = self.learners.publish_teacher_weights()
        assert isinstance(self.teacher.handle, Teachers)
        (pool,) = self.teacher.handle.pools

        def load() -> None:
            pool.remember("load_weights", weights, version)  # for a restarted engine
            pool.call_all("load_weights", weights, version)

        self.teacher_thread.submit(load).result()
        self.teacher_served = version

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics of the current weights. The eval uses the teacher and the engines,
        which a step made ahead must not share: its teacher signal is finished first."""
        self.steps.settle()
        self.sync_weights()
        metrics = heldout_metrics(
            self.rollout,
            self.teacher.handle,
            self.prompts.eval,
            self.prompts.task,
            max_new_tokens=self.cfg.rollout.max_new_tokens,
            seed=self.cfg.trainer.seed,
            version=self.state.version,
            feedback=self.eval_feedback,
            samples_per_prompt=self.cfg.rollout.n if self.eval_feedback is not None else 1,
            sample_temperature=self.cfg.trainer.eval_sample_temperature,
            sample_seed=eval_sample_seed(self.cfg.trainer.seed, step),
        )
        self.log.log(step, metrics, advance=False)
        return metrics

    def save(self, step: int) -> None:
        self.steps.before_save()
        self.sync_teacher(force=True)  # the resumed run's teacher engines get these weights
        staging = self.store.staging_dir(step)
        try:
            self.learners.save_checkpoint(str(staging / "learner"), LEARNER_TAG, {"step": step})
        except OSError as exc:  # a rank's write failed (disk full): the older ones survive
            shutil.rmtree(staging, ignore_errors=True)
            raise self.store.write_failed(step, exc) from None
        learner = self.cfg.learner
        self.store.commit(
            staging,
            step,
            {**self.state.to_json(learner), "fingerprint": self.fingerprint},
            rank_files=learner_rank_files(learner.num_learners, learner.zero_stage),
        )

    def export(self) -> None:
        # Staged and renamed: a kill part-way never leaves a student/ that looks finished.
        with staged_folder(self.cfg.run_dir / "student") as out:
            export_student(self.learners, self.student_path, self.tokenizer, out)

    # --- Plumbing -----------------------------------------------------------------------------

    def teacher_stream(self, chunks: Sequence[list[Sample]] = ()) -> TeacherStream:
        """A stream to the teacher actors (none for a stored signal, no teacher, or a teacher
        inside the learners), fed with `chunks` if given (a restored prefetched step's)."""
        stream = TeacherStream(self.teacher.scorer, self.teacher_thread)
        for key, chunk in enumerate(chunks):
            stream.add(key, chunk)
        return stream

    def close(self) -> None:
        # No rollout or teacher call may go on behind the driver's back once the pools go.
        self.steps.close()
        if isinstance(self.state.ahead, Pending):
            self.state.ahead.stream.close()
        self.teacher_thread.shutdown(wait=True)
        self.log.close()
        if self.samples_log is not None:
            self.samples_log.close()
        for pool in (self.rollout, self.teacher.handle):
            if pool is not None:
                pool.shutdown()
        self.learners.shutdown()
        # Only now: a second SIGTERM during the shutdown must not kill the process half-way.
        self.preemption.restore()


class Preemption:
    """SIGTERM (a scheduler, `ray job stop`) or SIGINT (Ctrl-C) asks the loop to checkpoint and
    stop after the current step; the handler only sets a flag, so no step is cut in half. A
    second Ctrl-C stops at once, without a checkpoint (the previous one resumes)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal's name once one came
        self._previous: dict[int, Any] = {}
        try:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught there
            self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print(
                "\nrayd: Ctrl-C: the current step finishes and is checkpointed, then the run "
                "stops; Ctrl-C again stops at once, without that checkpoint",
                file=sys.stderr,
            )
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
