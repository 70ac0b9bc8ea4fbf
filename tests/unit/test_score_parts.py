"""`rayd score`'s finished blocks: kept for the same job, discarded for another."""

import torch

from rayd.commands.score import _Parts
from rayd.types import TeacherScore


def _score(seed: int) -> TeacherScore:
    gen = torch.Generator().manual_seed(seed)
    return TeacherScore(
        token_logprobs=-torch.rand(5, generator=gen),
        topk_ids=torch.randint(0, 50, (5, 3), generator=gen),
        topk_logprobs=-torch.rand(5, 3, generator=gen),
    )


def test_blocks_round_trip_and_survive_only_for_the_same_job(tmp_path, capsys):
    folder = tmp_path / ".data-scored.parts"
    job = {"top_k": 3, "teacher": {"path": "t"}}
    scores = {4: _score(0), 9: _score(1)}
    _Parts(folder, job).save(0, scores)

    again = _Parts(folder, dict(job))  # a rerun of the same job
    got = again.load(0)
    assert got is not None and sorted(got) == [4, 9]
    for row, want in scores.items():
        assert torch.equal(got[row].token_logprobs, want.token_logprobs)
        assert torch.equal(got[row].topk_ids, want.topk_ids)
        assert torch.equal(got[row].topk_logprobs, want.topk_logprobs)
    assert again.load(1) is None

    # An unreadable block is scored again, not a crash.
    again.path(1).write_bytes(b"not a tensor file")
    assert again.load(1) is None
    assert "unreadable" in capsys.readouterr().err

    # Another k: the old blocks are not this job's.
    other = _Parts(folder, {**job, "top_k": 4})
    assert other.load(0) is None
    assert "discarding 2 scored blocks" in capsys.readouterr().err
    other.remove()
    assert not folder.exists()
