"""The pipelined loop's pieces without Ray: the saved prefetched step, staleness, the stream."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rayd.pipeline import Prepared, TeacherStream, check_staleness, staleness_metrics
from rayd.teacher.group import Scored
from rayd.types import Sample, TeacherScore


def _sample(index: int, version: int = 0, **kw) -> Sample:
    return Sample(
        [1, 2], [3, 4, 5], [-0.5, -1.25, -3.0e-8], prompt_index=index, weight_version=version, **kw
    )


def test_a_prefetched_step_survives_the_json_of_a_checkpoint() -> None:
    ids = torch.tensor([[3, 7], [4, 8], [5, 9]])
    step = Prepared(
        4,
        [[_sample(0, 2, student_topk_ids=ids)], [_sample(1, 2, finish_reason="length")]],
        prompt_indices=[0, 1],
    )
    back = Prepared.from_state(json.loads(json.dumps(step.to_state())))
    assert back.step == 4 and [len(c) for c in back.chunks] == [1, 1]
    assert back.prompt_indices == [0, 1]
    for got, want in zip(back.samples, step.samples, strict=True):
        if want.student_topk_ids is not None:
            assert torch.equal(got.student_topk_ids, want.student_topk_ids)
            got.student_topk_ids = want.student_topk_ids
        assert got == want  # log-probs bit for bit (JSON floats round-trip)


def test_staleness_is_checked_against_max_staleness() -> None:
    samples = [_sample(0, 4), _sample(1, 3), _sample(2, 1, on_policy=False)]
    check_staleness(samples, 4, 1)
    assert staleness_metrics(samples, 4) == {"staleness/mean": 0.5, "staleness/max": 1.0}
    with pytest.raises(RuntimeError, match="max_staleness=0"):
        check_staleness(samples, 4, 0)
    with pytest.raises(RuntimeError, match=r"versions \[4\]"):
        check_staleness(samples, 3, 2)  # from the future


def test_the_stream_returns_chunks_and_scores_in_key_order_whatever_the_arrival() -> None:
    def score(samples):
        got = [TeacherScore.empty(3) for _ in samples]
        for s, g in zip(samples, got, strict=True):
            g.token_logprobs[:] = s.prompt_index
        return Scored(got, [(list(range(len(got))), [g.token_logprobs for g in got])])

    thread = ThreadPoolExecutor(max_workers=1)
    stream = TeacherStream(score, thread)
    label = _sample(9, hard_target=True)
    stream.add(2, [_sample(4), label])
    stream.add(0, [_sample(0), _sample(1)])
    stream.add(1, [_sample(2)])
    chunks, scored = stream.finish()
    assert [[s.prompt_index for s in c] for c in chunks] == [[0, 1], [2], [4, 9]]
    assert [int(s.token_logprobs[0]) for s in scored.scores] == [0, 1, 2, 4]  # no hard target
    rows, logprobs = scored.own[0]
    assert rows == [0, 1, 2, 3] and [int(lp[0]) for lp in logprobs] == [0, 1, 2, 4]
    thread.shutdown()


def test_streams_sharing_the_teacher_thread_score_in_order_and_one_never_overlaps_another():
    # The pipelined loop's next step starts scoring while this step's calls may still run: one
    # shared thread keeps the teacher pools single-threaded and this step's calls first.
    calls: list[int] = []
    inside = threading.Lock()
    release = threading.Event()

    def score(samples):
        assert inside.acquire(blocking=False), "two teacher calls at once"
        try:
            if samples[0].prompt_index == 0:
                release.wait(timeout=10)  # this step's call is slow
            calls.append(samples[0].prompt_index)
            return Scored([TeacherScore.empty(3) for _ in samples], [])
        finally:
            inside.release()

    thread = ThreadPoolExecutor(max_workers=1)
    this_step, next_step = TeacherStream(score, thread), TeacherStream(score, thread)
    this_step.add(0, [_sample(0)])
    next_step.add(0, [_sample(1)])
    next_step.add(1, [_sample(2)])
    release.set()
    assert len(next_step.finish()[1].scores) == 2
    assert len(this_step.finish()[1].scores) == 1
    assert calls == [0, 1, 2]
    # A closed stream drops its calls not yet started and leaves the shared thread running.
    release.clear()
    blocked, dropped = TeacherStream(score, thread), TeacherStream(score, thread)
    blocked.add(0, [_sample(0)])
    dropped.add(0, [_sample(5)])
    dropped.close()
    release.set()
    blocked.finish()
    assert calls == [0, 1, 2, 0]
    assert thread.submit(lambda: 7).result() == 7
    thread.shutdown()


def test_config_defaults_keep_the_synchronous_loop_and_offline_modes_refuse_a_pipeline() -> None:
    from rayd.config import ConfigError, load_config

    base = ["models.student.path=s", "models.teacher.path=t"]
    cfg = load_config(None, base)
    assert cfg.trainer.max_staleness == 0 and cfg.rollout.truncated == "keep"
    assert load_config(None, [*base, "trainer.max_staleness=2"]).trainer.max_staleness == 2
    with pytest.raises(ConfigError, match=r"trainer\.max_staleness > 0 overlaps rollouts"):
        load_config(None, [*base, "algorithm.name=sft", "trainer.max_staleness=1"])
    with pytest.raises(ConfigError, match=r"rollout\.truncated"):
        load_config(None, [*base, "rollout.truncated=cut"])


def test_dropped_truncated_completions_leave_the_loss_but_keep_their_row() -> None:
    from rayd.types import training_batch

    samples = [_sample(0), _sample(1, finish_reason="length"), _sample(2, on_policy=False)]
    samples[2].finish_reason = "length"  # a dataset completion is never "truncated" by rollout
    scores = [TeacherScore.empty(3) for _ in samples]
    batch = training_batch(samples, scores, 0, learner_version=0, drop_truncated=True)
    assert len(batch) == 3
    assert batch.loss_mask.sum(1).tolist() == [3, 0, 3]
    kept = training_batch(samples, scores, 0, learner_version=0, drop_truncated=False)
    assert kept.loss_mask.sum(1).tolist() == [3, 3, 3]


def test_the_samples_log_reads_back_as_the_learners_got_it_and_resumes_like_the_metrics(
    tmp_path,
) -> None:
    from rayd.metrics import SamplesLog

    from helpers import logged_samples

    ids = torch.tensor([[3, 7], [4, 8], [5, 9]])
    steps = {
        1: [_sample(0, 0, student_topk_ids=ids), _sample(1, 0, hard_target=True)],
        2: [_sample(2, 1), _sample(3, 1, finish_reason="length")],
        3: [_sample(4, 2)],
    }
    scores = {
        s: [
            TeacherScore(torch.full((3,), -0.5 * s), torch.tensor([[1, 2]] * 3), torch.ones(3, 2))
            for _ in samples
        ]
        for s, samples in steps.items()
    }
    log = SamplesLog(tmp_path, "signal")
    for step, samples in steps.items():
        log.log(step, samples, scores[step] if step != 3 else None)
    log.close()
    back = logged_samples(tmp_path)
    assert [len(samples) for samples, _ in back] == [2, 2, 1]
    for (got, signal), step in zip(back, steps, strict=True):
        for sample, want, score, want_score in zip(
            got, steps[step], signal, scores[step], strict=True
        ):
            if want.student_topk_ids is not None:
                assert torch.equal(sample.student_topk_ids, want.student_topk_ids)
                sample.student_topk_ids = want.student_topk_ids
            assert sample == want  # every field, the log-probs bit for bit
            if want.hard_target or step == 3:  # no signal: a label row, or none in the batch
                assert score is None
            else:
                assert torch.equal(score.token_logprobs, want_score.token_logprobs)
                assert torch.equal(score.topk_ids, want_score.topk_ids)
                assert torch.equal(score.topk_logprobs, want_score.topk_logprobs)

    # Resumed from the checkpoint of step 1: steps 2 and 3 will be redone, so they go.
    SamplesLog(tmp_path, "tokens", start_step=1).close()
    assert [len(s) for s, _ in logged_samples(tmp_path)] == [2]
    # A fresh start in the same folder keeps the old log aside.
    SamplesLog(tmp_path, "tokens").close()
    assert not (tmp_path / "samples.jsonl").read_text()
    assert len(list(tmp_path.glob("samples-before-*.jsonl"))) == 1
    tokens = SamplesLog(tmp_path, "tokens")
    tokens.log(1, steps[1], scores[1])
    tokens.close()
    record = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert "teacher" not in record and record["completion_ids"] == [3, 4, 5]


@pytest.mark.parametrize(
    ("overrides", "source", "mode"),
    [
        ([], "actors", "Synchronous"),
        (["trainer.max_staleness=1"], "actors", "Pipelined"),
        (["algorithm.name=sft", "algorithm.loss=null"], "none", "Offline"),
        (["rollout.backend=learner"], "actors", "Synchronous"),
        (
            ["rollout.backend=learner", "teacher.support=full", "teacher.backend=hf"],
            "learners",
            "OneCall",
        ),
        # the driver adds to the batch between the samples and the update: two calls
        (
            ["rollout.backend=learner", "teacher.support=full", "algorithm.step_weighting=uniform"],
            "learners",
            "Synchronous",
        ),
        (
            ["rollout.backend=learner", "teacher.support=full", "algorithm.reward_weight=0.5"],
            "learners",
            "Synchronous",
        ),
    ],
)
def test_each_run_makes_its_steps_in_the_one_mode_that_fits(overrides, source, mode) -> None:
    from rayd.config import load_config
    from rayd.driver import step_mode
    from rayd.teacher.signal import teacher_source

    base = [
        "models.student.path=tiny:test-student",
        "models.teacher.path=tiny:test-teacher",
        "algorithm.loss=reverse_kl",
    ]
    cfg = load_config(None, [*base, *overrides])
    assert teacher_source(cfg.algorithm.needs_teacher, cfg.teacher.support, False) == source
    assert step_mode(cfg, source).__name__ == mode
