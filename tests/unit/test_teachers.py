"""Several teachers without Ray: the config, the routing field, and `Teachers` over fake pools
that answer like teacher actors (each a fixed distribution per position)."""

import json
import threading

import pytest
import torch

from rayd.config import ConfigError, load_config
from rayd.data.prompts import Prompt, PromptSet, load_prompts
from rayd.mixture import hash_route
from rayd.preflight import check_routes
from rayd.teacher.group import Teachers
from rayd.types import Sample, TeacherScore

TWO = [
    "models.student.path=s",
    "models.teachers=[{name: a, path: ta, weight: 3}, {name: b, path: tb}]",
]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["models.teacher.path=t"],
            "config error: give models.teacher (one teacher) or models.teachers",
        ),
        (
            ["models.teachers=[{name: a, path: ta}]"],
            "models.teachers lists two or more teachers; for one, use models.teacher",
        ),
        (
            ["models.teachers=[{name: a, path: ta}, {name: a, path: tb}]"],
            "names must differ (a repeated)",
        ),
        (["models.teachers=[{name: 'a b', path: ta}, {name: c, path: tb}]"], "teachers.0.name"),
        (["models.teachers=[{name: a, path: ta, weight: 0}, {name: c, path: tb}]"], "weight"),
        (["models.teachers=[{path: ta}, {name: c, path: tb}]"], "teachers.0.name: required"),
        (["teacher.route_field=source"], "teacher.route_field applies to teacher.combine=route"),
        (["algorithm.name=feature_kd", "teacher.backend=hf"], "feature_kd matches one teacher"),
    ],
)
def test_bad_teacher_lists_get_one_clear_line(overrides, needle):
    with pytest.raises(ConfigError, match="config error") as err:
        load_config(None, [*TWO, *overrides])
    assert needle in str(err.value), str(err.value)


def test_routing_needs_several_teachers():
    one = ["models.student.path=s", "models.teacher.path=t"]
    with pytest.raises(ConfigError, match=r"teacher\.combine=route needs several teachers"):
        load_config(None, [*one, "teacher.combine=route"])


def test_one_teacher_config_is_unchanged_and_lists_as_one():
    cfg = load_config(None, ["models.student.path=s", "models.teacher.path=t"])
    (only,) = cfg.models.teacher_list
    assert (only.name, only.path, only.weight) == ("teacher", "t", 1.0)
    assert cfg.models.teacher_key(0) == "models.teacher.path"
    cfg = load_config(None, [*TWO, "teacher.combine=route", "teacher.route_field=source"])
    assert [t.name for t in cfg.models.teacher_list] == ["a", "b"]
    assert cfg.models.teacher_key(1) == "models.teachers[1].path"


class FakePool:
    """A teacher actor pool whose teacher has the fixed distribution `probs` [V] at every
    position; records its calls. With a `barrier`, a call returns only once every pool sharing
    it is inside a call too: pools driven one after the other would break it."""

    def __init__(self, probs: list[float], barrier: threading.Barrier | None = None) -> None:
        self.logp = torch.tensor(probs).log()
        self.calls: list[tuple[str, int]] = []
        self.barrier = barrier
        self.faults = 0
        self.closed = False

    def map_chunks(self, method, pairs, *inputs, **kw):
        self.calls.append((method, len(pairs)))
        if self.barrier is not None:
            self.barrier.wait()  # raises BrokenBarrierError if the other pool never comes
        out = []
        for i, (_, completion) in enumerate(pairs):
            t = len(completion)
            token = self.logp[torch.tensor(completion)]
            if method == "score":
                top = self.logp.topk(kw["top_k"])
                ids, lps = top.indices.expand(t, -1), top.values.expand(t, -1)
            else:
                ids = inputs[0][i]
                lps = self.logp[ids]
                lps, order = lps.sort(-1, descending=True)
                ids = ids.gather(-1, order)
            out.append(TeacherScore(token, ids.clone(), lps.clone()))
        return out

    def call_all(self, method):
        return [True]

    def shutdown(self):
        self.closed = True


A = [0.5, 0.3, 0.1, 0.05, 0.05]
B = [0.1, 0.1, 0.2, 0.6, 0.0]  # an impossible token 4 for teacher b: log 0 = -inf
B[4], B[0] = 0.05, 0.05


def samples_for(n: int) -> list[Sample]:
    return [
        Sample([1], [i % 4, 2], [-1.0, -2.0], prompt_index=i, on_policy=i % 2 == 0)
        for i in range(n)
    ]


def test_ensemble_scores_the_union_exactly_with_hf_teachers():
    a, b = FakePool(A), FakePool(B)
    teachers = Teachers([a, b], ["a", "b"], [3.0, 1.0], backend="hf", vocab_size=5)
    samples = samples_for(3)
    pairs = [(s.prompt_ids, s.completion_ids) for s in samples]
    scored = teachers.score("score", pairs, top_k=2)
    # Both scored their top-2, then the union ({0, 1} and {3, 2}) exactly, side by side.
    assert a.calls == b.calls == [("score", 3), ("score_ids", 3)]
    mix = 0.75 * torch.tensor(A) + 0.25 * torch.tensor(B)
    for s, score in zip(samples, scored.scores, strict=True):
        assert score.topk_ids.shape == (2, 4)
        assert score.topk_ids[0].tolist() == [0, 1, 3, 2]  # sorted by the mixture
        torch.testing.assert_close(score.topk_logprobs[0], mix[[0, 1, 3, 2]].log())
        torch.testing.assert_close(score.token_logprobs, mix[s.completion_ids].log())
    metrics = teachers.metrics(samples, scored, "teacher/")
    # Each teacher alone, on the on-policy samples 0 and 2 (completions [0, 2] and [2, 2]).
    for name, p in (("a", A), ("b", B)):
        lp = torch.tensor(p).log()
        want = (2 * -3.0 - float(lp[0] + lp[2] + lp[2] + lp[2])) / 4
        assert metrics[f"teacher/{name}/reverse_kl"] == pytest.approx(want)
    assert "teacher/a/samples" not in metrics  # every teacher scores every sample
    teachers.shutdown()
    assert a.closed and b.closed


def test_ensemble_with_vllm_teachers_estimates_instead_of_a_second_pass():
    a, b = FakePool(A), FakePool(B)
    teachers = Teachers([a, b], ["a", "b"], [1.0, 1.0], backend="vllm", vocab_size=5)
    scored = teachers.score("score", [([1], [0])], top_k=2)
    assert a.calls == b.calls == [("score", 1)]
    score = scored.scores[0]
    got = dict(zip(score.topk_ids[0].tolist(), score.topk_logprobs[0], strict=True))
    # id 3 is outside a's top-2 {0, 1}: a's tail 0.2 spread over the 3 other ids.
    assert float(got[3].exp()) == pytest.approx(0.5 * 0.2 / 3 + 0.5 * 0.6)


def test_same_supports_need_no_second_pass():
    a, b = FakePool(A), FakePool(B)
    teachers = Teachers([a, b], ["a", "b"], [1.0, 1.0], backend="hf", vocab_size=5)
    ids = torch.tensor([[4, 0, 2], [1, 3, 0]])
    scored = teachers.score("score_ids", [([1], [0, 1])], [ids], add_top_k=0)
    assert a.calls == b.calls == [("score_ids", 1)]
    assert scored.scores[0].topk_ids.shape == (2, 3)  # the student's k, not 2k


def test_routing_splits_by_field_and_hash_and_keeps_the_order():
    both = threading.Barrier(2, timeout=60)  # only a deadlock guard: no timing is measured
    a, b = FakePool(A, both), FakePool(B, both)
    teachers = Teachers([a, b], ["a", "b"], [1.0, 1.0], combine="route", vocab_size=5)
    prompts = [Prompt(i, [1], None, None, route="b" if i < 3 else None) for i in range(12)]
    samples = samples_for(12)
    for s in samples:
        s.on_policy = True
    pairs = [(s.prompt_ids, s.completion_ids) for s in samples]
    scored = teachers.score("score", pairs, prompts=prompts, top_k=2)
    want = ["b"] * 3 + ["ab"[hash_route(i, [1.0, 1.0])] for i in range(3, 12)]
    assert want.count("a") and want.count("b") > 3  # both teachers get hash-routed rows
    for s, score, name in zip(samples, scored.scores, want, strict=True):
        lp = torch.tensor(A if name == "a" else B).log()
        torch.testing.assert_close(score.token_logprobs, lp[s.completion_ids])
    assert a.calls == [("score", want.count("a"))] and b.calls == [("score", want.count("b"))]
    metrics = teachers.metrics(samples, scored, "teacher/")
    assert metrics["teacher/a/samples"] == want.count("a")
    assert metrics["teacher/b/samples"] == want.count("b")
    assert set(metrics) >= {"teacher/a/reverse_kl", "teacher/b/reverse_kl"}


def test_one_teacher_goes_straight_to_its_pool():
    pool = FakePool(A)
    teachers = Teachers.single(pool)  # type: ignore[arg-type]
    scored = teachers.score("score", [([1], [0])], top_k=2)
    assert pool.calls == [("score", 1)] and scored.scores[0].topk_ids.shape == (1, 2)
    assert teachers.metrics(samples_for(1), scored, "teacher/") == {}


def test_route_field_from_jsonl_and_its_checks(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "</s>", *"0123456789+=A"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")
    rows = [
        {"prompt": f"{i}+1=", "completion": "A", **({"source": "b"} if i % 3 == 0 else {})}
        for i in range(10)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            *TWO,
            f"data.source={path}",
            "data.eval_size=2",
            "teacher.combine=route",
            "teacher.route_field=source",
        ],
    )
    prompts = load_prompts(cfg.data, tok, 32, 0, route_field="source")
    routes = [p.route for p in prompts.train + prompts.eval]
    assert sorted(routes, key=str) == sorted([r.get("source") for r in rows], key=str)
    check_routes(cfg, prompts)

    def with_routes(*names):
        return PromptSet(
            [Prompt(i, [1], None, None, route=n) for i, n in enumerate(names)], [], None
        )

    with pytest.raises(ConfigError, match="source='c', which names no teacher"):
        check_routes(cfg, with_routes("a", "c"))
    with pytest.raises(ConfigError, match="no training row has the field 'source'"):
        check_routes(cfg, with_routes(None, None))
    path.write_text(json.dumps({"prompt": "1+1=", "source": 3}) + "\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:1: field 'source' .* must name a teacher"):
        load_prompts(cfg.data, tok, 32, 0, route_field="source")


def test_the_in_learner_teacher_serves_the_evals_token_logprobs():
    """teacher.support=full: the eval's teacher log-probs come from learner rank 0 over the
    collated pairs; each pair gets its completion's columns (the learner group is faked: the
    real one runs in tests/e2e/test_teacher_signal.py)."""
    from rayd.teacher.group import LearnerTeacher

    class Learners:  # log-prob = the flat cell index of the target, so columns are checkable
        def teacher_logprobs(self, batch):
            self.batch = batch
            cells = torch.arange(batch.input_ids.numel(), dtype=torch.float32)
            return cells.reshape(batch.input_ids.shape)[:, 1:]

    learners = Learners()
    teacher = LearnerTeacher(learners)
    pairs = [([1, 2], [3, 4, 5]), ([7], [8])]
    scored = teacher.score("score", pairs, prompts=[], mix_support=False, top_k=1)
    assert learners.batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert [s.token_logprobs.tolist() for s in scored.scores] == [[2.0, 3.0, 4.0], [6.0]]
    assert teacher.metrics([], scored, "eval/teacher/") == {} and teacher.faults == 0
    with pytest.raises(ValueError, match="serves 'score' only"):
        teacher.score("score_ids", pairs, [torch.zeros(3, 1)])
