"""What a checkpoint was trained with, so that a resume notices a change.

A checkpoint's driver state holds the run's config (flattened to dotted keys) and a fingerprint
of its data: size and sha256 of every local data file, and a hash of the training and held-out
prompts as tokenised (which also covers task and hub sources). A resume compares both with the
run it is asked to continue and refuses a difference in one line naming it, unless the key is
in `trainer.allow_changes`. The keys that may always change are `MAY_CHANGE`: where the run
lives, how long it runs, how often it logs, evaluates and saves, and how it is executed, none of
which changes what a step computes. docs/reliability.md lists them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rayd.checkpoint import file_sha256
from rayd.config import ConfigError, DataConfig, RunConfig

# Keys (a section stands for every key in it) a resume may change without trainer.allow_changes.
MAY_CHANGE = (
    "name",
    "output_dir",
    "trainer.max_steps",
    "trainer.resume",  # the driver sets it on its own restarts
    "trainer.allow_changes",
    "trainer.eval_every",
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "trainer.actor_restarts",
    "trainer.learner_restarts",
    "trainer.call_timeout_s",
    "logging",
    "sync",  # both methods give the engines the same weights (tests/ray/test_weight_stream.py)
    # how a served teacher is reached, not which model it is (teacher.served_model is checked)
    "teacher.urls",
    "teacher.request_timeout_s",
    "teacher.request_retries",
    "teacher.max_concurrency",
    "teacher.api_key_env",
    "teacher.ca_bundle",
    "teacher.max_response_mb",
)
DATA_KEY = "data"  # what trainer.allow_changes names to accept changed data


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as dotted keys -> JSON values (lists kept whole; a section's own key says
    that it is set)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            if prefix:  # a section that is set: it differs from one set to None
                out[prefix[:-1]] = "<set>"
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            out[prefix[:-1]] = value

    walk("", cfg.model_dump(mode="json"))
    return out


def _defaults() -> dict[str, Any]:
    """Every setting's default, flattened (the two model paths are placeholders)."""
    models = {"student": {"path": "-"}, "teacher": {"path": "-"}}
    return flat_config(RunConfig.model_validate({"models": models}))


def data_files(data: DataConfig) -> list[Path]:
    """The local files a run's data is read from (task and hub sources have none)."""
    files = []
    if not data.source.startswith(("task:", "hub:")):
        files.append(Path(data.source))
    if data.train_dataset is not None:
        files += sorted(p for p in Path(data.train_dataset).rglob("*") if p.is_file())
    return files


def _prompts_sha256(prompts: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.ids, p.completion_ids]).encode())
    return digest.hexdigest()


def fingerprint(cfg: RunConfig, train: Iterable[Any], held_out: Iterable[Any]) -> dict[str, Any]:
    """What a checkpoint records: the flat config and the data's fingerprint."""
    files = {
        str(p): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in data_files(cfg.data)
    }
    return {
        "config": flat_config(cfg),
        "data": {
            "files": files,
            "train_prompts": _prompts_sha256(train),
            "eval_prompts": _prompts_sha256(held_out),
        },
    }


def _allowed(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allowed)


def differences(saved: dict[str, Any], now: dict[str, Any], allow: Iterable[str]) -> list[str]:
    """What differs between a checkpoint's fingerprint and the run's, less what may change.
    Allowing a changed `data.*` key (or `data`) accepts the data it reads."""
    changed, accepted = [], []
    old_cfg, new_cfg = saved["config"], now["config"]
    defaults = _defaults()
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key not in new_cfg:  # a setting this version of rayd no longer has
            continue
        after = new_cfg[key]
        # A setting newer than the checkpoint: the run it continues had its default.
        before = old_cfg.get(key, defaults.get(key, "<unset>"))
        if before == after or _allowed(key, MAY_CHANGE):
            continue
        if _allowed(key, allow):
            accepted.append(key)
        else:
            changed.append(f"{key} {before!r} -> {after!r}")
    if DATA_KEY in allow or any(_allowed(key, [DATA_KEY]) for key in accepted):
        return changed
    old_data, new_data = saved["data"], now["data"]
    old_files, new_files = old_data["files"], new_data["files"]
    for path in sorted(set(old_files) | set(new_files)):
        before, after = old_files.get(path), new_files.get(path)
        if before == after:
            continue
        if before is None or after is None:
            changed.append(f"data file {path} {'added' if before is None else 'gone'}")
        elif before["size"] != after["size"]:
            changed.append(f"data file {path} ({before['size']} -> {after['size']} bytes)")
        else:
            changed.append(f"data file {path} (same size, other content)")
    if not changed:  # a changed config or file explains changed prompts already
        for split in ("train_prompts", "eval_prompts"):
            if old_data[split] != new_data[split]:
                changed.append(f"the {split.replace('_', ' ')} (same files, other rows or tokens)")
    return changed


def check_resume(
    saved: dict[str, Any], now: dict[str, Any], allow: Iterable[str], where: str
) -> str | None:
    """Raise when the checkpoint at `where` was trained otherwise; a line to print when it
    predates fingerprints (nothing could be checked), else None."""
    recorded = saved.get("fingerprint")
    if recorded is None:
        return (
            f"rayd: {where} was saved before rayd recorded the config and data a checkpoint "
            "trained with: this resume could not check that they are unchanged"
        )
    changed = differences(recorded, now, allow)
    if changed:
        keys = ",".join(
            sorted(
                {
                    DATA_KEY if c.startswith(("data file ", "the ")) else c.split(" ")[0]
                    for c in changed
                }
            )
        )
        raise ConfigError(
            f"config error: the checkpoint to resume ({where}) was trained with other settings: "
            + "; ".join(changed)
            + f". Resume with the settings it was saved with, add trainer.allow_changes=[{keys}] "
            "to resume anyway, or start a new run under a new name"
        )
    return None
