"""Rollout and teacher workers as real Ray actors with real engines (vLLM CPU and transformers).

Every number an engine reports is checked against a direct transformers computation on the same
tokens. The weight-sync test loads a different checkpoint into a running engine and proves the
sync by teacher-forced log-probs: they must match the new weights and must not match the old.

Engines start once per module (about 18 s each for vLLM on CPU), all four in parallel.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayd.cluster import get
from rayd.models import build_tiny_llama
from rayd.rollout.spec import EngineSpec
from rayd.rollout.worker import RolloutWorker
from rayd.sampling import Sampling, prompt_seeds
from rayd.teacher.scorer import TeacherSignalError, check_scores
from rayd.teacher.worker import TeacherWorker
from rayd.types import TeacherScore
from rayd.weight_sync import serialize_state_dict

import helpers

MAX_LEN = 256
TIMEOUT = 300  # seconds; generous for a busy 2-core machine, still a deadline
BACKENDS = ["vllm", "hf"]


def engine_spec(path, backend: str, max_model_len: int = MAX_LEN) -> EngineSpec:
    return helpers.engine_spec(path, backend, dtype="auto", max_model_len=max_model_len)


def load_hf(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def next_token_logits(model, sequence: list[int]) -> torch.Tensor:
    """[len - 1, V] float32 logits predicting sequence[1:], one unpadded forward pass."""
    return model(input_ids=torch.tensor([sequence])).logits[0, :-1].float()


def sampling_logprobs(model, prompt, completion, **processing) -> torch.Tensor:
    """Log-probs of the completion under the distribution the sampler draws from (processed)."""
    logp = sampling_distribution(model, prompt, completion, **processing)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def sampling_distribution(model, prompt, completion, *, temperature, top_p, eos_id):
    """[T, V] processed log-probs at each completion step: temperature, top-p, min_tokens."""
    logits = next_token_logits(model, prompt + completion)[len(prompt) - 1 :]
    logits = logits / temperature
    logits[0, eos_id] = float("-inf")  # min_tokens=1: no eos at the first step
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    # Nucleus: drop a token when the mass strictly before it already exceeds top_p.
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf")).log_softmax(-1)


def forced_logprobs(model, sequence) -> torch.Tensor:
    logp = next_token_logits(model, sequence).log_softmax(-1)
    return logp.gather(-1, torch.tensor(sequence[1:])[:, None]).squeeze(-1)


def random_ids(generator: torch.Generator, length: int, vocab: int) -> list[int]:
    return torch.randint(4, vocab, (length,), generator=generator).tolist()  # skip special ids


@pytest.fixture(scope="module")
def workers(ray_local, tiny_student, tiny_teacher):
    """All four engines, started in parallel; killed when the module is done."""
    rollout_cls = ray.remote(RolloutWorker).options(num_cpus=1)
    teacher_cls = ray.remote(TeacherWorker).options(num_cpus=1)
    actors = SimpleNamespace(
        rollout={b: rollout_cls.remote(engine_spec(tiny_student, b)) for b in BACKENDS},
        teacher={b: teacher_cls.remote(engine_spec(tiny_teacher, b)) for b in BACKENDS},
    )
    every = [*actors.rollout.values(), *actors.teacher.values()]
    assert all(get([a.ready.remote() for a in every], TIMEOUT, "start workers"))
    yield actors
    for actor in every:
        ray.kill(actor)


@pytest.fixture(scope="module")
def student(tiny_student):
    return load_hf(tiny_student)


@pytest.fixture(scope="module")
def tokenizer(tiny_student):
    return AutoTokenizer.from_pretrained(str(tiny_student))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollout_samples_are_well_formed_and_match_transformers(
    backend, workers, student, tokenizer
):
    actor = workers.rollout[backend]
    gen = torch.Generator().manual_seed(0)
    vocab = student.config.vocab_size
    prompts = [random_ids(gen, length, vocab) for length in (5, 17, 40)]
    kwargs = dict(sampling=Sampling(2, 0.8, 0.95, 12, return_topk=4), seed=123)
    samples = get(actor.generate.remote(prompts, [7, 8, 9], **kwargs), TIMEOUT, "generate")

    assert len(samples) == 6
    assert [s.prompt_index for s in samples] == [7, 7, 8, 8, 9, 9]
    eos = tokenizer.eos_token_id
    for i, s in enumerate(samples):
        assert s.prompt_ids == prompts[i // 2]
        assert 1 <= len(s.completion_ids) <= 12
        assert len(s.logprobs) == len(s.completion_ids)
        assert s.finish_reason in ("stop", "length")
        # A completion ends at its first eos and includes it; "length" means no eos at all.
        assert (s.finish_reason == "stop") == (s.completion_ids[-1] == eos)
        assert eos not in s.completion_ids[:-1]
        assert s.finish_reason == "stop" or len(s.completion_ids) == 12
        assert s.weight_version == 0 and s.on_policy
        assert s.text == tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        dist = sampling_distribution(
            student, s.prompt_ids, s.completion_ids, temperature=0.8, top_p=0.95, eos_id=eos
        )
        expected = dist.gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-3, rtol=0)
        # The student's top-4 at each step (teacher.support=student_topk), most likely first;
        # compared through the reference's log-probs, so near-ties cannot flake the test.
        ids = s.student_topk_ids
        assert ids is not None and ids.shape == (len(s.completion_ids), 4)
        assert all(len(set(row)) == 4 for row in ids.tolist())
        top = dist.topk(4, dim=-1).values
        torch.testing.assert_close(dist.gather(-1, ids), top, atol=1e-3, rtol=0)

    # The same seed draws the same samples, with or without the top-k ids.
    kwargs["sampling"] = Sampling(2, 0.8, 0.95, 12)
    again = get(actor.generate.remote(prompts, [7, 8, 9], **kwargs), TIMEOUT, "generate")
    assert [s.completion_ids for s in again] == [s.completion_ids for s in samples]
    assert all(s.student_topk_ids is None for s in again)
    if backend == "vllm":
        # Seeds follow the prompt's dataset index, not its place in the call: the slice a
        # pool's second worker gets draws what the whole batch on one worker would.
        alone = get(actor.generate.remote(prompts[2:], [9], **kwargs), TIMEOUT, "generate")
        assert [s.completion_ids for s in alone] == [s.completion_ids for s in samples[4:]]
        # The training driver's form: seeds computed over the whole batch, sliced with it.
        batch_seeds = prompt_seeds(kwargs.pop("seed"), [7, 8, 9])
        sliced = actor.generate.remote(prompts[2:], [9], batch_seeds[2:], **kwargs)
        assert [s.completion_ids for s in get(sliced, TIMEOUT, "generate")] == [
            s.completion_ids for s in samples[4:]
        ]


def test_seeded_prompts_beyond_one_steps_token_budget(workers, student):
    """More seeded prompt tokens than one engine step schedules (vLLM's 4096 on CPU): chunked
    prefill would split a prompt over two steps, and vLLM then rewinds that request's generator,
    which a CPU generator cannot do ("CPU Generator does not use offset"; a 36-token chat prompt
    x 114 requests of an eval hit it). The CPU engine schedules whole prompts instead, and a
    prompt draws the same sample in a crowd as alone."""
    actor = workers.rollout["vllm"]
    gen = torch.Generator().manual_seed(1)
    prompts = [random_ids(gen, 20, student.config.vocab_size) for _ in range(250)]
    kwargs = dict(sampling=Sampling(1, 1.0, 1.0, 3), seed=5)
    crowd = get(actor.generate.remote(prompts, list(range(250)), **kwargs), TIMEOUT, "generate")
    assert len(crowd) == 250
    alone = get(actor.generate.remote(prompts[-1:], [249], **kwargs), TIMEOUT, "generate")
    assert alone[0].completion_ids == crowd[-1].completion_ids


def test_teacher_scorers_agree_with_each_other_and_transformers(workers, tiny_teacher):
    teacher = load_hf(tiny_teacher)
    vocab = teacher.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    pairs = [
        (random_ids(gen, p, vocab), random_ids(gen, c, vocab))
        for p, c in ((1, 1), (3, 9), (30, 20), (12, 1), (60, 33))
    ]
    k = 5
    by_vllm = get(workers.teacher["vllm"].score.remote(pairs, k), TIMEOUT, "vllm score")
    by_hf = get(workers.teacher["hf"].score.remote(pairs, k, True), TIMEOUT, "hf score")

    close = dict(atol=1e-4, rtol=0)
    for (prompt, completion), v, h in zip(pairs, by_vllm, by_hf, strict=True):
        logp = next_token_logits(teacher, prompt + completion)[len(prompt) - 1 :].log_softmax(-1)
        direct_token = logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        direct_top = logp.topk(k, dim=-1)
        for score in (v, h):
            torch.testing.assert_close(score.token_logprobs, direct_token, **close)
            torch.testing.assert_close(score.topk_logprobs, direct_top.values, **close)
            # Ids compared through the reference's log-probs, so near-ties cannot flake the test.
            torch.testing.assert_close(logp.gather(-1, score.topk_ids), direct_top.values, **close)
        assert torch.equal(v.topk_ids, h.topk_ids)
        assert v.logits is None
        assert h.logits is not None and h.logits.shape == (len(completion), vocab)
        torch.testing.assert_close(h.logits.log_softmax(-1), logp, **close)

    # Scoring caller-chosen ids (teacher.support=student_topk): exact log-probs at those ids,
    # sorted by them; scoring the teacher's own top-k that way reproduces `score`.
    chosen_ids = [torch.randint(0, vocab, (len(c), 3), generator=gen) for _, c in pairs]
    hf = workers.teacher["hf"]
    chosen = get(hf.score_ids.remote(pairs, chosen_ids), TIMEOUT, "hf score_ids")
    union = get(hf.score_ids.remote(pairs, chosen_ids, add_top_k=k), TIMEOUT, "hf score_ids")
    again = get(hf.score_ids.remote(pairs, [v.topk_ids for v in by_vllm]), TIMEOUT, "score_ids")
    for (prompt, completion), ids, c, u, a, v in zip(
        pairs, chosen_ids, chosen, union, again, by_vllm, strict=True
    ):
        logp = next_token_logits(teacher, prompt + completion)[len(prompt) - 1 :].log_softmax(-1)
        direct_token = logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        for score in (c, u):
            torch.testing.assert_close(score.token_logprobs, direct_token, **close)
            torch.testing.assert_close(
                score.topk_logprobs, logp.gather(-1, score.topk_ids), **close
            )
        assert torch.equal(c.topk_ids.sort(-1).values, ids.sort(-1).values)
        # union: the chosen ids plus the teacher's top-k among the others, so it holds the
        # teacher's own top-k (through the reference's values: ties cannot flake this).
        assert u.topk_ids.shape == (len(completion), 3 + k)
        for row, chosen_row in zip(u.topk_ids.tolist(), ids.tolist(), strict=True):
            assert set(chosen_row) <= set(row)
        top_values = logp.gather(-1, u.topk_ids).topk(k, dim=-1).values
        torch.testing.assert_close(top_values, logp.topk(k, dim=-1).values, **close)
        assert torch.equal(a.topk_ids, v.topk_ids)
        torch.testing.assert_close(a.topk_logprobs, v.topk_logprobs, **close)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_teacher_that_follows_the_student_scores_with_the_weights_it_loads(
    backend, workers, tiny_teacher, tmp_path
):
    """models.teacher: self with teacher actors: the learners' EMA (or live) weights arrive
    as a blob, and the scores that follow are those of the new weights, not the old."""
    actor = workers.teacher[backend]
    teacher = load_hf(tiny_teacher)
    other = load_hf(
        build_tiny_llama(tmp_path, layers=3, hidden=96, heads=3, max_positions=512, seed=9)
    )
    gen = torch.Generator().manual_seed(3)
    vocab = teacher.config.vocab_size
    pairs = [(random_ids(gen, 150, vocab), random_ids(gen, 20, vocab)), ([5, 6], [7, 8, 9])]

    def token_logprobs_of(model):
        return [forced_logprobs(model, p + c)[len(p) - 1 :] for p, c in pairs]

    def scored():
        return [s.token_logprobs for s in get(actor.score.remote(pairs, 3), TIMEOUT, "score")]

    for got, want in zip(scored(), token_logprobs_of(teacher), strict=True):  # fills the cache
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    blob = serialize_state_dict(other.state_dict())
    assert get(actor.load_weights.remote(blob, 7), TIMEOUT, "teacher load_weights") == 7
    for got, want, before in zip(
        scored(), token_logprobs_of(other), token_logprobs_of(teacher), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert (got - before).abs().max() > 1e-2  # the old weights are really gone
    # back to the module's own teacher for the other tests
    blob = serialize_state_dict(teacher.state_dict())
    assert get(actor.load_weights.remote(blob, 8), TIMEOUT, "teacher load_weights") == 8


def test_teacher_rejects_bad_requests(workers):
    vllm_teacher, hf_teacher = workers.teacher["vllm"], workers.teacher["hf"]
    with pytest.raises(ValueError, match="empty prompt"):
        get(hf_teacher.score.remote([([], [5, 6])], 3), TIMEOUT, "score")
    with pytest.raises(ValueError, match="max_model_len"):
        get(vllm_teacher.score.remote([([5] * 200, [6] * 56)], 3), TIMEOUT, "score")
    with pytest.raises(ValueError, match="vocabulary"):
        get(vllm_teacher.score.remote([([5], [10_000])], 3), TIMEOUT, "score")
    with pytest.raises(ValueError, match="max_top_k"):
        get(vllm_teacher.score.remote([([5], [6])], 21), TIMEOUT, "score")
    with pytest.raises(ValueError, match="full teacher logits"):
        get(vllm_teacher.score.remote([([5], [6])], 3, True), TIMEOUT, "score")
    with pytest.raises(ValueError, match="'hf' teacher backend"):
        get(vllm_teacher.score_ids.remote([([5], [6])], [torch.ones(1, 2)]), TIMEOUT, "score")
    with pytest.raises(ValueError, match="ids of shape"):
        get(hf_teacher.score_ids.remote([([5], [6, 7])], [torch.ones(1, 2)]), TIMEOUT, "score")
    # The engine survived the refusals.
    assert len(get(vllm_teacher.score.remote([([5], [6])], 3), TIMEOUT, "score")) == 1


def test_check_scores_refuses_non_finite_signal():
    score = TeacherScore(
        token_logprobs=torch.tensor([-1.0, float("nan")]),
        topk_ids=torch.zeros((2, 1), dtype=torch.long),
        topk_logprobs=torch.tensor([[-0.5], [-0.5]]),
    )
    with pytest.raises(TeacherSignalError, match="1/2"):
        check_scores([([1], [5, 6])], [score], top_k=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlong_prompt_is_refused_before_the_engine(backend, workers):
    actor = workers.rollout[backend]
    kwargs = dict(sampling=Sampling.plain(16))
    with pytest.raises(ValueError, match="max_model_len=256"):
        get(actor.generate.remote([[5] * (MAX_LEN - 16 + 1)], [0], **kwargs), TIMEOUT, "generate")
    with pytest.raises(ValueError, match=r"need 2\.\.255"):
        get(actor.logprobs.remote([[5] * MAX_LEN]), TIMEOUT, "logprobs")
    # The longest allowed prompt still works: the engine is alive and the limit is exact.
    samples = get(actor.generate.remote([[5] * (MAX_LEN - 16)], [0], **kwargs), TIMEOUT, "gen")
    assert len(samples) == 1 and len(samples[0].prompt_ids) == MAX_LEN - 16


@pytest.fixture(scope="module")
def other_student(tmp_path_factory, tiny_student):
    """Same architecture as the student, different weights: what a learner step would send."""
    path = build_tiny_llama(
        tmp_path_factory.mktemp("student2"), layers=2, hidden=64, heads=2, max_positions=512, seed=7
    )
    return load_hf(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_sync_is_proven_by_logprobs(backend, workers, student, other_student, tokenizer):
    actor = workers.rollout[backend]
    gen = torch.Generator().manual_seed(2)
    vocab = student.config.vocab_size
    # 150 tokens: longer than one 128-token vLLM-CPU KV block, so the prompt enters the prefix
    # cache before the sync and a stale cache would show up after it.
    long_prompt = random_ids(gen, 150, vocab)
    sequences = [long_prompt + random_ids(gen, 20, vocab), random_ids(gen, 9, vocab)]
    old = [forced_logprobs(student, s) for s in sequences]
    new = [forced_logprobs(other_student, s) for s in sequences]

    def engine_logprobs():
        return get(actor.logprobs.remote(sequences), TIMEOUT, "logprobs")

    def rollout():
        kwargs = dict(sampling=Sampling(2, 1.0, 1.0, 8), seed=5)
        return get(actor.generate.remote([long_prompt], [0], **kwargs), TIMEOUT, "generate")

    for got, want in zip(engine_logprobs(), old, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert all(s.weight_version == 0 for s in rollout())  # fills the prefix cache

    blob = serialize_state_dict(other_student.state_dict())
    assert get(actor.load_weights.remote(blob, 1), TIMEOUT, "load_weights") == 1
    assert get(actor.weight_version.remote(), TIMEOUT, "weight_version") == 1
    for got, want, before in zip(engine_logprobs(), new, old, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert (got - before).abs().max() > 1e-2  # the old weights are really gone
    # Sampling after the sync uses the new weights too (including the cached prompt prefix).
    for s in rollout():
        assert s.weight_version == 1
        expected = sampling_logprobs(
            other_student,
            s.prompt_ids,
            s.completion_ids,
            temperature=1.0,
            top_p=1.0,
            eos_id=tokenizer.eos_token_id,
        )
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-3, rtol=0)

    # And back: the engine serves the original weights again, as version 2.
    blob = serialize_state_dict(student.state_dict())
    assert get(actor.load_weights.remote(blob, 2), TIMEOUT, "load_weights") == 2
    for got, want in zip(engine_logprobs(), old, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_weight_blob_is_refused(backend, workers, student):
    actor = workers.rollout[backend]
    state = dict(student.state_dict())
    del state["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(RuntimeError, match=r"unloaded|missing"):
        get(actor.load_weights.remote(serialize_state_dict(state), 3), TIMEOUT, "load_weights")
    # Some layers may hold new weights and others old ones: the worker says so and refuses.
    assert get(actor.weight_version.remote(), TIMEOUT, "weight_version") == -1
    kwargs = dict(sampling=Sampling.plain(4))
    with pytest.raises(RuntimeError, match="load weights again"):
        get(actor.generate.remote([[5, 6]], [0], **kwargs), TIMEOUT, "generate")
    # A complete load brings it back.
    blob = serialize_state_dict(student.state_dict())
    assert get(actor.load_weights.remote(blob, 4), TIMEOUT, "load_weights") == 4
    assert len(get(actor.generate.remote([[5, 6]], [0], **kwargs), TIMEOUT, "generate")) == 1


def test_weight_sync_with_tied_embeddings(ray_local, tmp_path):
    """Most small pretrained models tie the LM head to the embedding (SmolLM2, Qwen2.5-0.5B): the
    blob carries the shared tensor once, and the engine's head must follow the new embedding."""
    paths = [
        build_tiny_llama(
            tmp_path / f"tied{seed}", layers=2, hidden=64, heads=2, seed=seed, tie_embeddings=True
        )
        for seed in (0, 7)
    ]
    old, new = (load_hf(p) for p in paths)
    assert new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()
    actor = (
        ray.remote(RolloutWorker)
        .options(num_cpus=1)
        .remote(engine_spec(paths[0], "vllm", max_model_len=128))
    )
    try:
        sequence = random_ids(torch.Generator().manual_seed(3), 40, old.config.vocab_size)
        got = get(actor.logprobs.remote([sequence]), TIMEOUT, "logprobs")[0]
        torch.testing.assert_close(got, forced_logprobs(old, sequence), atol=1e-4, rtol=0)
        get(actor.load_weights.remote(serialize_state_dict(new.state_dict()), 1), TIMEOUT, "load")
        got = get(actor.logprobs.remote([sequence]), TIMEOUT, "logprobs")[0]
        torch.testing.assert_close(got, forced_logprobs(new, sequence), atol=1e-4, rtol=0)
    finally:
        ray.kill(actor)
