"""The transformers rollout engine without Ray: its sampling loop draws exactly what transformers'
`generate` draws, and over a live model (rollout.backend=learner: a learner rank samples with the
module it trains) it draws what an engine loaded from the same weights draws, leaving the
owner's train mode and RNG stream as they were."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rayd.rollout.hf_engine import HFEngine, Sampler
from rayd.rollout.worker import RolloutWorker
from rayd.sampling import Sampling, prompt_seeds
from rayd.tasks import make_task
from rayd.zoo import resolve_model_path

from helpers import engine_spec

PROMPTS = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def spec():
    path = resolve_model_path("tiny:test-student", seed=0)
    return engine_spec(path, "learner", max_model_len=64)


def sample(engine, seeds):
    return engine.generate(PROMPTS, Sampling(2, 1.0, 0.9, 12, return_topk=3), seeds=seeds)


def test_a_live_engine_draws_what_a_loaded_one_does_and_leaves_its_owner_alone(spec):
    loaded = HFEngine(spec.for_worker(0))
    owned = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=torch.float32).train()
    live = HFEngine(spec, model=owned)
    seeds = prompt_seeds(7, [0, 1, 2])

    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    got = sample(live, seeds)
    assert torch.equal(torch.get_rng_state(), rng_before), "the owner's RNG stream moved"
    assert owned.training, "the owner's module was left in eval mode"

    want = sample(loaded, seeds)
    for got_prompt, want_prompt in zip(got, want, strict=True):
        for g, w in zip(got_prompt, want_prompt, strict=True):
            assert g.token_ids == w.token_ids
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-6)
            assert g.finish_reason == w.finish_reason
            assert torch.equal(g.topk_ids, w.topk_ids)
    # Same seeds, same draw: a resumed run samples what the unbroken one did.
    assert [c.token_ids for p in sample(live, seeds) for c in p] == [
        c.token_ids for p in got for c in p
    ]


def test_a_live_engine_follows_its_owners_updates_and_loads_nothing(spec):
    owned = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=torch.float32)
    worker = RolloutWorker(spec, engine=HFEngine(spec, model=owned))
    before = worker.logprobs([PROMPTS[0]])[0]
    with torch.no_grad():  # what an optimizer step does: the same module, changed in place
        owned.get_output_embeddings().weight.mul_(3.0)
    worker.weights_changed(1)
    after = worker.logprobs([PROMPTS[0]])[0]
    assert not torch.allclose(before, after), "the engine did not see its owner's new weights"
    assert worker.weight_version() == 1
    samples = worker.generate([PROMPTS[0]], [0], seed=3, sampling=Sampling.plain(4))
    assert samples[0].weight_version == 1
    with pytest.raises(RuntimeError, match="nothing to load"):
        worker.engine.load_weights(b"")


@pytest.mark.parametrize(
    ("temperature", "top_p", "n"), [(1.0, 1.0, 1), (0.7, 0.9, 2), (1.3, 0.5, 3), (0.0, 1.0, 1)]
)
def test_the_sampling_loop_draws_what_transformers_generate_draws(temperature, top_p, n):
    # The test teacher has learnt to end its answers: rows stop at different steps.
    path = resolve_model_path("tiny:test-teacher", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = make_task("addition", seed=0, digits=2).examples("eval", 6)
    prompts = [tokenizer(e.prompt, add_special_tokens=False).input_ids for e in examples]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    config = GenerationConfig(
        **sampling,
        top_k=0,
        max_new_tokens=30,
        min_new_tokens=1,
        num_return_sequences=n,
        eos_token_id=[eos],
        pad_token_id=pad,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        # The loop draws from a stream of its own, seeded as generate's global one was.
        stream = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sampler = Sampler([eos], pad, temperature, top_p, 30, n, stream)
            tokens, scores = sampler.run(model, ids, mask)
        assert torch.equal(tokens, want.sequences[:, width:])
        assert torch.equal(scores, torch.stack(want.scores, dim=1))
        assert (tokens == eos).any(1).any() and (tokens == pad).any(), "no row stopped early"


def test_a_lora_student_samples_through_its_peft_wrapper(spec):
    from rayd.config import LoraConfig
    from rayd.learner.lora import lora_model

    base = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=torch.float32)
    wrapped = lora_model(base, LoraConfig(r=4, alpha=8, dropout=0.1)).train()
    # Fresh adapters (B = 0) leave the outputs as they were: the loaded engine's draws.
    seeds = prompt_seeds(5, [0, 1, 2])
    got = sample(HFEngine(spec, model=wrapped), seeds)
    want = sample(HFEngine(spec.for_worker(0)), seeds)
    assert [c.token_ids for p in got for c in p] == [c.token_ids for p in want for c in p]
    assert wrapped.training
