"""The real-model forgetting measure (rayd/commands/bench/forgetting.py): KL(start || trained)
on the start model's own answers is 0 for the start model itself and grows as the weights move."""

import torch

from rayd.commands.bench.forgetting import _load, drift, everyday_answers
from rayd.models import build_tiny_llama


def test_drift_is_zero_for_the_start_and_grows_with_the_change(tmp_path) -> None:
    path = build_tiny_llama(tmp_path / "start", layers=1, hidden=32, heads=2, seed=0)
    start, tokenizer = _load(str(path))
    answers = everyday_answers(start, tokenizer, prompts=["12+34=", "5+6=", "70+8="])
    assert all(len(seq) > n for n, seq in answers)  # each answer has at least one token
    assert drift(start, start, answers) == 0.0
    drifts = []
    for scale in (0.01, 0.1):
        moved, _ = _load(str(path))
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            for p in moved.parameters():
                p.add_(scale * torch.randn(p.shape, generator=generator))
        drifts.append(drift(start, moved, answers))
    assert 0.0 < drifts[0] < drifts[1]
    # The same seed samples the same answers: every trained model is scored on the same text.
    assert everyday_answers(start, tokenizer, prompts=["12+34=", "5+6=", "70+8="]) == answers
