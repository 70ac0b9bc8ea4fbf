"""A run folder's boundaries (issue 38): one process at a time, a rerun that fails its checks
leaves the folder byte for byte as it was, the final student/ is written whole or not at all,
checkpoints are sealed only with every rank's files and survive a full disk and a re-save,
untrusted checkpoint files run no code, and a resume notices a changed config or data set.
Nothing here starts an actor: each case fails before one would, or calls the part directly."""

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rayd.checkpoint import (
    CheckpointError,
    CheckpointStore,
    learner_rank_files,
    safe_torch_load,
)
from rayd.config import ConfigError, load_config
from rayd.fingerprint import check_resume, differences, fingerprint
from rayd.run_folder import locked_folder

from helpers import run_cli as rayd
from helpers import snapshot, tiny_run_folder


def broken_jsonl(tmp: Path) -> Path:
    data = tmp / "data.jsonl"
    rows = [json.dumps({"prompt": f"{i}+1=", "completion": f"A={i + 1}"}) for i in range(40)]
    data.write_text("\n".join([*rows[:20], "{not json", *rows[20:]]) + "\n")
    return data


def finished_run(tmp: Path) -> Path:
    """A run folder as a finished run leaves it: its config, metrics and student."""
    run = tiny_run_folder(tmp)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (run / "summary.json").write_text('{"steps": 1}\n')
    return run


def train_argv(run: Path, data: Path) -> list[str]:
    """`rayd train` of the tiny pair into `run`, on `data`."""
    base = run.parent / "base.yaml"
    base.write_text("{}\n")
    return [
        "train",
        str(base),
        "models.student.path=tiny:test-student",
        "models.teacher.path=tiny:test-teacher",
        "data.eval_size=4",
        "logging.progress=false",
        f"output_dir={run}",
        f"data.source={data}",
    ]


def test_a_rerun_that_fails_its_checks_changes_nothing(tmp_path, capsys) -> None:
    run = finished_run(tmp_path)
    before = snapshot(run)
    assert rayd(train_argv(run, broken_jsonl(tmp_path))) == 2
    assert "data.jsonl:21" in capsys.readouterr().err
    assert snapshot(run) == before  # config.yaml above all: eval and export read it


def test_a_fresh_run_that_fails_its_checks_leaves_no_folder(tmp_path, capsys) -> None:
    run = tmp_path / "new-run"
    assert rayd(train_argv(run, broken_jsonl(tmp_path))) == 2
    assert not run.exists()


def test_a_second_run_in_a_held_folder_is_refused(tmp_path, capsys) -> None:
    run = finished_run(tmp_path)
    before = snapshot(run)
    capsys.readouterr()
    with locked_folder(run):  # another rayd process's run, as far as the kernel can tell
        assert rayd(train_argv(run, broken_jsonl(tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another rayd run" in err[0], err
    assert snapshot(run) == before
    with locked_folder(run):  # released when the first ended
        pass


def test_the_student_is_written_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    """A failure (or kill) part-way through the export leaves no student/ that eval and export
    would take as finished."""
    import rayd.driver as driver

    def half_export(learners, student_path, tokenizer, out: Path) -> None:
        (out / "config.json").write_text("{}")  # what eval and export look for
        raise RuntimeError("killed part-way")

    monkeypatch.setattr(driver, "export_student", half_export)
    run = SimpleNamespace(
        cfg=SimpleNamespace(run_dir=tmp_path), learners=None, student_path="", tokenizer=None
    )
    with pytest.raises(RuntimeError, match="part-way"):
        driver.Run.export(run)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- checkpoints ------------------------------------------------------------------------------


def staged(store: CheckpointStore, step: int, ranks: int, skip: str = "") -> Path:
    staging = store.staging_dir(step)
    for rel in learner_rank_files(ranks, 2):
        if rel != skip:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(f"{rel} of step {step}".encode())
    return staging


def test_a_checkpoint_without_every_ranks_files_is_not_sealed(tmp_path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    missing = "learner/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    staging = staged(store, 4, ranks=2, skip=missing)
    with pytest.raises(
        CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt missing"
    ):
        store.commit(staging, 4, {}, rank_files=learner_rank_files(2, 2))
    assert sorted(p.name for p in store.root.iterdir()) == []  # nothing sealed, nothing left


def test_re_saving_a_step_keeps_the_old_one_until_the_new_one_is_in(tmp_path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    files = learner_rank_files(2, 2)
    store.commit(staged(store, 4, 2), 4, {}, rank_files=files)
    before = snapshot(store.root / "step-000004")
    rename = os.rename

    def failing_rename(src, dst) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(CheckpointError, match="Input/output error"):
        store.commit(staged(store, 4, 2), 4, {"again": True}, rank_files=files)
    assert snapshot(store.root / "step-000004") == before
    assert CheckpointStore.verify(store.root / "step-000004") is None


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(
    tmp_path, monkeypatch
) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    files = learner_rank_files(2, 2)
    store.commit(staged(store, 2, 2), 2, {}, rank_files=files)
    write_text = Path.write_text

    def full_disk(self: Path, *args, **kwargs):
        if self.name == "driver.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(CheckpointError) as caught:
        store.commit(staged(store, 4, 2), 4, {}, rank_files=files)
    line = str(caught.value)
    assert "\n" not in line and line.startswith("disk full while writing the checkpoint of step 4")
    assert "step-000002 is intact" in line
    assert sorted(p.name for p in store.root.iterdir()) == ["step-000002"]
    assert CheckpointStore.verify(store.root / "step-000002") is None


def test_a_step_moved_aside_by_a_killed_re_save_is_put_back(tmp_path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    store.commit(staged(store, 4, 1), 4, {})
    os.rename(store.root / "step-000004", store.root / ".old-step-000004")  # killed here
    ckpt = store.select("auto")
    assert ckpt is not None and ckpt.step == 4


# --- untrusted files ---------------------------------------------------------------------------


class Payload:
    """A pickle that runs code when it is loaded: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"torch": torch.zeros(2), "python": Payload(marker)}, tmp_path / "rng_rank0.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_torch_load(tmp_path / "rng_rank0.pt")
    assert not marker.exists()
    torch.save({"torch": torch.zeros(2), "python": (3, (1, 2), None)}, tmp_path / "plain.pt")
    assert safe_torch_load(tmp_path / "plain.pt")["python"] == (3, (1, 2), None)


def test_export_of_a_planted_checkpoint_runs_no_code(tmp_path, capsys) -> None:
    """`rayd export` of a run folder received from someone else: its checkpoint's model
    states hold a payload (a ZeRO-0 layout, which export reads with torch.load)."""
    run = finished_run(tmp_path)
    shutil.rmtree(run / "student")
    marker = tmp_path / "code-ran"
    store = CheckpointStore(run / "checkpoints")
    staging = store.staging_dir(1)
    (staging / "learner" / "state").mkdir()
    torch.save({"module": Payload(marker)}, staging / "learner/state/mp_rank_00_model_states.pt")
    store.commit(staging, 1, {})
    assert rayd(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "refused to load" in err[-1], err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# --- resume fingerprints -----------------------------------------------------------------------


def prompt(ids: list[int]) -> SimpleNamespace:
    return SimpleNamespace(ids=ids, completion_ids=[1])


def test_a_resume_names_each_change_and_allows_only_what_may_change(tmp_path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "A=2"}\n' * 3)
    base = [
        "models.student.path=tiny:test-student",
        "models.teacher.path=tiny:test-teacher",
        f"data.source={data}",
    ]
    train, held_out = [prompt([1, 2])], [prompt([3])]
    saved = {"fingerprint": fingerprint(load_config(None, base), train, held_out)}

    def resumed(*changes: str, prompts=train) -> dict:
        return fingerprint(load_config(None, [*base, *changes]), prompts, held_out)

    same = resumed("trainer.max_steps=99", "trainer.resume=must", "logging.tensorboard=false")
    assert check_resume(saved, same, [], "ckpt") is None
    with pytest.raises(ConfigError) as caught:
        check_resume(saved, resumed("learner.optim.lr=3e-4", "algorithm.loss=jsd"), [], "ckpt")
    line = str(caught.value)
    assert "learner.optim.lr 0.001 -> 0.0003" in line and "algorithm.loss" in line
    assert "trainer.allow_changes=[algorithm.loss,learner.optim.lr]" in line
    assert check_resume(saved, resumed("learner.optim.lr=3e-4"), ["learner.optim"], "c") is None
    data.write_text('{"prompt": "1+1=", "completion": "A=3"}\n' * 3)
    assert differences(saved["fingerprint"], resumed(), []) == [
        f"data file {data} (same size, other content)"
    ]
    assert check_resume(saved, resumed(), ["data"], "ckpt") is None
    data.write_text('{"prompt": "1+1=", "completion": "A=2"}\n' * 3)
    assert differences(saved["fingerprint"], resumed(prompts=[prompt([1, 9])]), []) == [
        "the train prompts (same files, other rows or tokens)"
    ]
    newer = resumed()  # a checkpoint of a rayd without teacher.top_k: it had the default
    older = {**saved["fingerprint"], "config": dict(saved["fingerprint"]["config"])}
    del older["config"]["teacher.top_k"]
    assert differences(older, newer, []) == []
    assert differences(older, resumed("teacher.top_k=4"), []) == ["teacher.top_k 8 -> 4"]
    lora = resumed("learner.lora.r=4")
    assert differences(lora, same, []) == ["learner.lora '<set>' -> None"]
    old = check_resume({}, same, [], "step-000004")
    assert old is not None and "could not check" in old


def test_train_refuses_to_resume_a_checkpoint_of_another_config(tmp_path, monkeypatch) -> None:
    """Through the driver: the refusal comes before any actor starts."""
    base = [
        "models.student.path=tiny:test-student",
        "models.teacher.path=tiny:test-teacher",
        f"output_dir={tmp_path}/run",
        "data.eval_size=4",
        "data.train_size=16",
        "learner.num_learners=1",
        "learner.micro_batch_size=8",
        "logging.progress=false",
    ]
    from rayd.driver import train
    from rayd.preflight import preflight

    cfg = load_config(None, base)
    checked = preflight(cfg)
    saved = {
        "num_learners": 1,
        "zero_stage": 2,
        "fingerprint": fingerprint(cfg, checked.prompts.train, checked.prompts.eval),
    }
    store = CheckpointStore(cfg.run_dir / "checkpoints")
    store.commit(staged(store, 4, 1), 4, saved)
    before = snapshot(cfg.run_dir)
    with pytest.raises(ConfigError, match=r"learner\.optim\.lr 0\.001 -> 0\.01"):
        train(load_config(None, [*base, "learner.optim.lr=1e-2"]))
    with pytest.raises(ConfigError, match=r"data\.train_size 16 -> 12.*\[data\.train_size\]"):
        train(load_config(None, [*base, "data.train_size=12"]))
    assert snapshot(cfg.run_dir) == before
