"""Weights & Biases logging with the real wandb package in offline mode (no account, no network):
the run folder gets a W&B run holding the config and every step, a resumed rayd run continues the
same W&B run, and a missing package is one clear error."""

import importlib.util
from pathlib import Path

import pytest

from rayd.config import ConfigError, load_config
from rayd.metrics import MetricsLogger, start_trackers

BASE = ["models.student.path=tiny:test-student", "models.teacher.path=tiny:test-teacher"]


def wandb_config(run: Path):
    return load_config(
        None,
        [
            *BASE,
            f"output_dir={run}",
            "logging.wandb.project=rayd-tests",
            "logging.wandb.mode=offline",
            "logging.progress=false",
            "logging.tensorboard=false",
        ],
    )


def log_steps(run: Path, cfg, steps: range, start_step: int = 0) -> dict:
    """Log `steps` (and an eval) the way the training loop does; returns what the live W&B run
    held before it finished: its id, config and summary."""
    trackers = start_trackers(run, cfg)
    log = MetricsLogger(run, cfg.logging, 10, start_step=start_step, trackers=trackers)
    for step in steps:
        log.log(step, {"loss": 1.0 / step, "reverse_kl": 2.0 / step, "skipped": 0.0})
    log.log(steps[-1], {"eval/accuracy": 0.5}, advance=False)
    live = trackers.wandb_run
    seen = {"id": live.id, "config": dict(live.config), "summary": dict(live.summary)}
    log.close()
    return seen


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_holds_config_and_steps_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = wandb_config(run)
    first = log_steps(run, cfg, range(1, 4))
    assert first["id"] == (run / "wandb_run_id").read_text().strip()
    assert first["config"]["models"]["student"]["path"] == "tiny:test-student"
    assert first["config"]["logging"]["wandb"]["project"] == "rayd-tests"
    summary = first["summary"]
    assert summary["trainer/step"] == 3 and summary["loss"] == pytest.approx(1 / 3)
    assert summary["eval/accuracy"] == 0.5
    # The offline run is on disk, under the run folder, for `wandb sync`.
    (folder,) = (run / "wandb").glob(f"offline-run-*-{first['id']}")
    assert (folder / f"run-{first['id']}.wandb").stat().st_size > 0

    # Resumed from a checkpoint at step 2: the same W&B run, steps 3.. logged again.
    again = log_steps(run, cfg, range(3, 6), start_step=2)
    assert again["id"] == first["id"]
    assert again["summary"]["trainer/step"] == 5


def test_missing_wandb_is_one_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"logging.wandb is set but the wandb package"):
        start_trackers(tmp_path / "run", wandb_config(tmp_path / "run"))


def test_no_tracker_configured_starts_nothing(tmp_path):
    cfg = load_config(None, [*BASE, f"output_dir={tmp_path}"])
    assert start_trackers(tmp_path, cfg) is None
