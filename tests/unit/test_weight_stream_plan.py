"""The bucket plan of a streamed weight sync (rayd.rollout.weight_stream.plan_buckets), which the
sender and every receiver compute apart and must agree on, and the sync section's checks."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from rayd.config import ConfigError, SyncConfig, load_config
from rayd.rollout.weight_stream import ALIGN, nbytes_of, plan_buckets, send_buckets

DTYPES = ["float32", "bfloat16", "float16", "float32"]


def random_tensors(seed: int, count: int) -> tuple[list[str], list[list[int]]]:
    rng = random.Random(seed)
    dtypes = [rng.choice(DTYPES) for _ in range(count)]
    shapes = [[rng.randint(1, 40) for _ in range(rng.randint(1, 3))] for _ in range(count)]
    return dtypes, shapes


@pytest.mark.parametrize("bucket_bytes", [16, 64, 1000, 4096, 1 << 20])
@pytest.mark.parametrize("seed", range(5))
def test_every_byte_travels_once_within_the_bound(seed, bucket_bytes):
    dtypes, shapes = random_tensors(seed, 30)
    plan = plan_buckets(dtypes, shapes, bucket_bytes)
    covered: dict[int, list[tuple[int, int]]] = {}
    for bucket in plan:
        assert 0 < bucket.nbytes <= bucket_bytes
        spans = sorted((off, off + hi - lo) for _, lo, hi, off in bucket.pieces)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start  # pieces of one bucket never overlap
        assert max(end for _, end in spans) == bucket.nbytes
        for index, lo, hi, off in bucket.pieces:
            covered.setdefault(index, []).append((lo, hi))
            if lo == 0 and hi == nbytes_of(dtypes[index], shapes[index]):
                assert off % ALIGN == 0  # a whole tensor is a legal view of the buffer
    assert sorted(covered) == list(range(len(dtypes)))  # in order, none left out
    for index, ranges in covered.items():
        size = nbytes_of(dtypes[index], shapes[index])
        assert ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        if size <= bucket_bytes:
            assert len(ranges) == 1  # a tensor that fits a bucket is never cut


def test_a_tensor_larger_than_a_bucket_travels_in_pieces():
    plan = plan_buckets(["float32", "float32"], [[1000], [3]], 1024)  # 4000 bytes, then 12
    pieces = [p for bucket in plan for p in bucket.pieces]
    assert [(i, lo, hi) for i, lo, hi, _ in pieces] == [
        (0, 0, 1024),
        (0, 1024, 2048),
        (0, 2048, 3072),
        (0, 3072, 4000),
        (1, 0, 12),
    ]
    assert [b.nbytes for b in plan] == [1024, 1024, 1024, 928 + 12]


def test_sent_bytes_reassemble_into_the_tensors():
    """The sender's buckets, unpacked by the plan as the engine does, give back every tensor."""
    dtypes, shapes = random_tensors(11, 12)
    tensors = [torch.randn(s).to(getattr(torch, d)) for d, s in zip(dtypes, shapes, strict=True)]
    sent: list[torch.Tensor] = []

    class Recorder:  # a group of one: what `broadcast` would put on the wire
        def broadcast(self, buffer, root, timeout):
            sent.append(buffer.clone())
            return self

        def wait(self):
            return True

    total, count = send_buckets(Recorder(), iter(tensors), dtypes, shapes, 100, 5.0)
    plan = plan_buckets(dtypes, shapes, 100)
    assert count == len(plan) == len(sent) and total == sum(b.nbytes for b in plan)
    out = [
        torch.empty(nbytes_of(d, s), dtype=torch.uint8) for d, s in zip(dtypes, shapes, strict=True)
    ]
    for bucket, wire in zip(plan, sent, strict=True):
        for index, lo, hi, off in bucket.pieces:
            out[index][lo:hi] = wire[off : off + hi - lo]
    for t, raw, d, s in zip(tensors, out, dtypes, shapes, strict=True):
        assert torch.equal(raw.view(getattr(torch, d)).view(s), t)


def test_the_sync_section():
    assert SyncConfig().streams("vllm", 0, 1)  # auto: the stream where it can
    assert SyncConfig(method="stream").streams("vllm", 0, 1)
    assert not SyncConfig().streams("hf", 0, 2)  # transformers engines cannot join a group
    assert not SyncConfig().streams("vllm", 1, 1)  # a lost lone engine has no one to stand in
    assert SyncConfig().streams("vllm", 1, 2)
    assert not SyncConfig(method="blob").streams("vllm", 0, 2)
    assert SyncConfig(bucket_mib=4 / 1024).bucket_bytes == 4096


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sync.bucket_mib=0", "sync.bucket_mib"),
        ("sync.bucket_mib=8192", "sync.bucket_mib"),
        ("sync.method=stream rollout.backend=hf", "needs rollout.backend=vllm"),
        ("sync.method=stream trainer.max_staleness=1", "rollout.num_workers >= 2"),
    ],
)
def test_bad_sync_settings_are_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/demo/tiny.yaml", override.split())
