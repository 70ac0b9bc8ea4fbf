"""Output flags replace only what rayd made (issue 38): `rayd export --force` and `rayd score
--out` leave a folder of the user's, and any folder holding their input, byte for byte as it
was; an earlier export or scored dataset is still replaced."""

from pathlib import Path

import pytest

from rayd.commands.eval import EXPORT_RECORD
from rayd.commands.export import check_out
from rayd.teacher.stored import SIGNAL_FILE

from helpers import run_cli as rayd
from helpers import snapshot
from helpers import tiny_run_folder as run_folder


def users_folder(tmp: Path) -> Path:
    folder = tmp / "mine"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "thesis.txt").write_bytes(b"three years of work\n\x00\xff")
    (folder / "config.json").write_text("{}")
    return folder


def test_export_force_leaves_a_folder_rayd_did_not_write(tmp_path, capsys) -> None:
    run, mine = run_folder(tmp_path), users_folder(tmp_path)
    before = snapshot(mine)
    capsys.readouterr()  # the setup's lines (a tiny model built once)
    assert rayd(["export", str(run), "--out", str(mine), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a rayd export (no rayd_export.json in it)" in err[0]
    assert snapshot(mine) == before


def test_export_force_still_replaces_an_earlier_export(tmp_path) -> None:
    run, earlier = run_folder(tmp_path), tmp_path / "export"
    earlier.mkdir()
    (earlier / EXPORT_RECORD).write_text("{}")
    check_out(run, earlier, force=True)  # no error: rayd made it


@pytest.mark.parametrize("where", ["above the dataset", "a folder of the user's"])
def test_score_out_leaves_the_data_and_the_users_folders(tmp_path, capsys, where) -> None:
    data = users_folder(tmp_path)  # stands in for a dataset: the check comes before reading it
    dataset = data / "notes"
    out = data if where == "above the dataset" else users_folder(tmp_path / "other")
    before = snapshot(data) | snapshot(out)
    capsys.readouterr()
    (tmp_path / "base.yaml").write_text("{}\n")
    argv = ["score", str(tmp_path / "base.yaml"), "algorithm.name=logit_kd"]
    argv += ["models.student.path=tiny:test-student", "models.teacher.path=tiny:test-teacher"]
    assert rayd([*argv, f"data.train_dataset={dataset}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    needle = "holds data.train_dataset (" if where == "above the dataset" else SIGNAL_FILE
    assert len(err) == 1 and needle in err[0]
    assert snapshot(data) | snapshot(out) == before
