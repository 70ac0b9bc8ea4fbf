"""Per-prompt sampling seeds: independent of the slice a prompt lands in."""

import itertools

from rayd.sampling import prompt_seeds


def test_a_prompt_keeps_its_seed_wherever_it_sits_in_the_call():
    whole = prompt_seeds(5, [10, 11, 12, 13])
    # A pool of two workers hands each half of the batch: the seeds are the same.
    assert prompt_seeds(5, [10, 11]) + prompt_seeds(5, [12, 13]) == whole
    assert prompt_seeds(5, [13, 10]) == [whole[3], whole[0]]


def test_seeds_differ_across_prompts_calls_and_repeats():
    seeds = prompt_seeds(5, list(range(1000)))
    assert len(set(seeds)) == 1000
    # vLLM's child j of an n-sample request uses seed + j: the prompts' streams stay apart.
    starts = sorted(seeds)
    assert min(b - a for a, b in itertools.pairwise(starts)) > 8
    assert prompt_seeds(6, [10]) != prompt_seeds(5, [10])  # another step's seed
    # A prompt drawn twice in one call gets two different streams, in a fixed order.
    twice = prompt_seeds(5, [10, 10])
    assert twice[0] == prompt_seeds(5, [10])[0] and twice[1] != twice[0]
    assert all(0 <= s < 2**30 for s in seeds)
