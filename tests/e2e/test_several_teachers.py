"""Several teachers end to end on a local Ray: two teacher pools (tiny:test-teacher and
tiny:test-reasoner, transformers backends), a random student, on-policy dense reverse KL.

- ensemble: the learners get sum_i w_i p_i, checked against the two teachers run by hand on the
  recorded batches (sampled token and every id of the support), and the held-out reverse KL to
  the mixture falls;
- route: every sample is scored by the teacher its row names (a `teacher` JSONL field) or, for
  rows without one, by the hash rule; checked against the teachers run by hand, and the
  per-teacher sample counts add up to the batch.
"""

import json

import torch
from transformers import AutoModelForCausalLM

from rayd.config import load_config
from rayd.data.prompts import load_prompts
from rayd.driver import train
from rayd.mixture import hash_route
from rayd.preflight import check_models
from rayd.tasks import make_task
from rayd.zoo import resolve_model_path

from helpers import TINY_CONFIG, logged_samples, step_records

TEACHERS = (
    "models.teachers=[{name: adder, path: 'tiny:test-teacher', weight: 0.7}, "
    "{name: reasoner, path: 'tiny:test-reasoner', weight: 0.3}]"
)
COMMON = [
    "models.teacher=null",
    TEACHERS,
    "teacher.backend=hf",
    "teacher.top_k=8",
    "rollout.backend=hf",  # transformers engines start in seconds, vLLM in ~20
    "logging.progress=false",
    "logging.samples=signal",  # samples.jsonl: what the learners got, checked below
]


def teacher_logprobs(seed: int) -> dict[str, object]:
    """Per teacher name, a function (prompt ids, completion ids) -> [T, V] log-probs."""
    out = {}
    for name, preset in (("adder", "tiny:test-teacher"), ("reasoner", "tiny:test-reasoner")):
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(preset, seed=seed), dtype=torch.float32
        ).eval()

        def logp(prompt, completion, model=model):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, :-1]
            return logits.log_softmax(-1)[len(prompt) - 1 :]

        out[name] = logp
    return out


def test_ensemble_of_two_teachers(ray_local, tmp_path):
    cfg = load_config(
        TINY_CONFIG,
        [*COMMON, "name=ensemble", f"output_dir={tmp_path}/{{name}}", "trainer.max_steps=30"],
    )
    summary = train(cfg)
    steps = step_records(cfg.run_dir)
    assert len(steps) == 30 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    for key in ("teacher/adder/reverse_kl", "teacher/reasoner/reverse_kl", "faults/teacher"):
        assert key in steps[-1], key
    before, after = summary["initial"], summary["final"]
    assert after["eval/reverse_kl"] < 0.75 * before["eval/reverse_kl"], (before, after)
    assert {"eval/teacher/adder/reverse_kl", "eval/teacher/reasoner/reverse_kl"} <= set(after)

    # The learners got log(0.7 p_adder + 0.3 p_reasoner): at the sampled token, and at every id
    # of the support, which holds both teachers' top-8 (sorted by the mixture, descending).
    logp = teacher_logprobs(cfg.trainer.seed)
    for samples, scores in logged_samples(cfg.run_dir, steps=2):
        for sample, score in list(zip(samples, scores, strict=True))[:4]:
            a = logp["adder"](sample.prompt_ids, sample.completion_ids)
            r = logp["reasoner"](sample.prompt_ids, sample.completion_ids)
            mix = torch.logsumexp(
                torch.stack([a + torch.tensor(0.7).log(), r + torch.tensor(0.3).log()]), 0
            )
            targets = torch.tensor(sample.completion_ids)[:, None]
            torch.testing.assert_close(
                score.token_logprobs, mix.gather(-1, targets)[:, 0], atol=1e-5, rtol=0
            )
            assert score.topk_ids.shape == (len(sample.completion_ids), 16)
            torch.testing.assert_close(
                score.topk_logprobs, mix.gather(-1, score.topk_ids), atol=1e-5, rtol=0
            )
            assert bool((score.topk_logprobs[:, 1:] <= score.topk_logprobs[:, :-1]).all())
            for t in range(len(sample.completion_ids)):
                union = set(a[t].topk(8).indices.tolist()) | set(r[t].topk(8).indices.tolist())
                assert set(score.topk_ids[t].tolist()) == union


def test_routed_teachers(ray_local, tmp_path):
    examples = make_task("addition", seed=0).examples("train", 120)
    data = tmp_path / "mixed.jsonl"
    # Every third row names its teacher; the others are routed by the hash rule (0.7 / 0.3).
    data.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": e.prompt,
                    "completion": e.completion,
                    **({"teacher": "reasoner"} if i % 3 == 0 else {}),
                }
            )
            + "\n"
            for i, e in enumerate(examples)
        )
    )
    overrides = [
        *COMMON,
        "name=route",
        f"output_dir={tmp_path}/{{name}}",
        "teacher.combine=route",
        "teacher.route_field=teacher",
        f"data.source={data}",
        "trainer.max_steps=6",
    ]
    cfg = load_config(TINY_CONFIG, overrides)
    summary = train(cfg)
    steps = step_records(cfg.run_dir)
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    per_step = cfg.trainer.prompts_per_step * cfg.rollout.n
    for r in steps:
        assert r["teacher/adder/samples"] + r["teacher/reasoner/samples"] == per_step
    assert {"eval/teacher/adder/reverse_kl", "eval/teacher/reasoner/reverse_kl"} <= set(
        summary["final"]
    )

    # The rule, from the same prompts the run loaded: the named teacher, else the hash.
    _, _, tokenizer, _ = check_models(cfg)
    prompts = load_prompts(
        cfg.data,
        tokenizer,
        cfg.rollout.max_model_len - cfg.rollout.max_new_tokens,
        cfg.trainer.seed,
        route_field="teacher",
    ).train
    names = ["adder", "reasoner"]
    logp = teacher_logprobs(cfg.trainer.seed)
    routed = {"adder": 0, "reasoner": 0}
    for samples, scores in logged_samples(cfg.run_dir, steps=3):
        for sample, score in zip(samples, scores, strict=True):
            prompt = prompts[sample.prompt_index]
            name = prompt.route or names[hash_route(prompt.index, [0.7, 0.3])]
            routed[name] += 1
            lp = logp[name](sample.prompt_ids, sample.completion_ids)
            targets = torch.tensor(sample.completion_ids)[:, None]
            torch.testing.assert_close(
                score.token_logprobs, lp.gather(-1, targets)[:, 0], atol=1e-5, rtol=0
            )
            assert score.topk_ids.shape == (len(sample.completion_ids), 8)
    assert routed["adder"] and routed["reasoner"]
    assert [routed["adder"], routed["reasoner"]] == [
        sum(r[f"teacher/{n}/samples"] for r in steps[:3]) for n in names
    ]
