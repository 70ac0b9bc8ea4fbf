"""Weights & Biases logging with the real wandb package in offline mode (no account, no network):
the run folder gets a W&B run holding the config and every step, a resumed rayd run continues the
same W&B run, and a missing package is one clear error."""

import importlib.util
import json
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


def log_steps(run: Path, cfg, steps: range, start_step: int = 0) -> None:
    trackers = start_trackers(run, cfg)
    log = MetricsLogger(run, cfg.logging, 10, start_step=start_step, trackers=trackers)
    for step in steps:
        log.log(step, {"loss": 1.0 / step, "reverse_kl": 2.0 / step, "skipped": 0.0})
    log.log(steps[-1], {"eval/accuracy": 0.5}, advance=False)
    log.close()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_holds_config_and_steps_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = wandb_config(run)
    log_steps(run, cfg, range(1, 4))
    run_id = (run / "wandb_run_id").read_text().strip()
    folders = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1, list((run / "wandb").iterdir())
    files = folders[0] / "files"
    config = (files / "config.yaml").read_text()
    assert "rayd-tests" in config and "tiny:test-student" in config
    summary = json.loads((files / "wandb-summary.json").read_text())
    assert summary["trainer/step"] == 3 and summary["loss"] == pytest.approx(1 / 3)
    assert summary["eval/accuracy"] == 0.5

    # Resumed from a checkpoint at step 2: the same W&B run id, steps 3.. logged again.
    log_steps(run, cfg, range(3, 6), start_step=2)
    assert (run / "wandb_run_id").read_text().strip() == run_id
    resumed = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    summary = json.loads((resumed[-1] / "files" / "wandb-summary.json").read_text())
    assert summary["trainer/step"] == 5


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
