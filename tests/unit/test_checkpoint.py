"""CheckpointStore without Ray: atomic commit, keep-last-K, and every corruption kind detected."""

import json
import os
import shutil

import pytest

from rayd.checkpoint import MANIFEST, CheckpointError, CheckpointStore


def write_checkpoint(store: CheckpointStore, step: int) -> None:
    staging = store.staging_dir(step)
    # Stand-ins for what DeepSpeed writes: a model file and an optimizer shard per rank.
    (staging / "learner" / "state").mkdir()
    (staging / "learner" / "state" / "model.pt").write_bytes(os.urandom(4096))
    (staging / "learner" / "state" / "optim_rank0.pt").write_bytes(os.urandom(2048))
    (staging / "learner" / "latest").write_text("state")
    store.commit(staging, step, {"version": step, "sampler": {"epoch": 0, "offset": step}})


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(tmp_path / "checkpoints", keep=3)


def test_commit_is_atomic_and_keeps_the_last_k(store):
    for step in (10, 20, 30, 40):
        write_checkpoint(store, step)
    names = sorted(p.name for p in store.root.iterdir())
    assert names == ["step-000020", "step-000030", "step-000040"]
    ckpt = store.select("auto")
    assert ckpt.step == 40
    assert ckpt.driver_state() == {"version": 40, "sampler": {"epoch": 0, "offset": 40}, "step": 40}


def test_a_crashed_save_is_never_read(store):
    write_checkpoint(store, 10)
    staging = store.staging_dir(20)  # learners wrote, the driver died before commit
    (staging / "learner" / "model.pt").write_bytes(b"half")
    assert store.select("auto").step == 10


def _truncate(path):
    f = path / "learner" / "state" / "model.pt"
    f.write_bytes(f.read_bytes()[:100])


def _flip(path):
    f = path / "learner" / "state" / "optim_rank0.pt"
    data = bytearray(f.read_bytes())
    data[7] ^= 0xFF
    f.write_bytes(bytes(data))


def _no_manifest(path):
    (path / MANIFEST).unlink()


def _no_shard(path):
    (path / "learner" / "state" / "optim_rank0.pt").unlink()


def _empty(path):
    shutil.rmtree(path)
    path.mkdir()


def _bad_manifest(path):
    (path / MANIFEST).write_text("{not json")


def _wrong_step(path):
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["step"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated file": (_truncate, "bytes, manifest says"),
    "flipped bytes": (_flip, "checksum mismatch"),
    "missing manifest": (_no_manifest, "MANIFEST.json missing"),
    "missing shard": (_no_shard, "optim_rank0.pt missing"),
    "empty folder": (_empty, "MANIFEST.json missing"),
    "unreadable manifest": (_bad_manifest, "unreadable"),
    "manifest of another step": (_wrong_step, "is for step 99"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_newest_falls_back_to_previous_with_a_warning(store, kind):
    corrupt, reason = CORRUPTIONS[kind]
    write_checkpoint(store, 10)
    write_checkpoint(store, 20)
    corrupt(store.root / "step-000020")
    with pytest.warns(UserWarning, match=reason):
        ckpt = store.select("auto")
    assert ckpt.step == 10


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_auto_refuses_to_start_over_when_no_checkpoint_verifies(store, kind):
    corrupt, reason = CORRUPTIONS[kind]
    write_checkpoint(store, 10)
    corrupt(store.root / "step-000010")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="none verifies"):
        store.select("auto")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=reason):
        store.select("must")


def test_resume_modes_on_an_empty_folder(store):
    assert store.select("auto") is None
    assert store.select("never") is None
    with pytest.raises(CheckpointError, match="resume=must but there is no checkpoint"):
        store.select("must")


def test_never_refuses_to_overwrite_existing_checkpoints(store):
    write_checkpoint(store, 10)
    with pytest.raises(CheckpointError, match="resume=never but"):
        store.select("never")
