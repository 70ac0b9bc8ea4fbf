"""Resumable checkpoints: atomic, verifiable, the last K kept.

Layout under `<run>/checkpoints/`:
    step-000040/
        learner/...        DeepSpeed's files (model, optimizer and ZeRO shards, LR schedule)
        driver.json        step, weight version, prompt-sampler cursor, driver RNG state
        MANIFEST.json      every other file with its size and sha256; written last
A checkpoint is written into `.tmp-step-000040/`, every file fsynced, the manifest added, and
only then renamed into place, so a crash mid-save leaves a `.tmp-*` folder that is never read.
Old checkpoints are deleted only after a new one is complete.

Loading walks from the newest checkpoint down and takes the first whose manifest verifies; a
corrupt one is reported with what is wrong and skipped. `resume=auto` refuses to start from
scratch when checkpoints exist but none verifies (DeepSpeed's load_checkpoint without a `latest`
tag returns (None, None) with a warning, and OpenRLHF and verl then train from scratch). Every
learner must see this folder: one machine, or shared storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MANIFEST = "MANIFEST.json"
DRIVER_STATE = "driver.json"
LEARNER_DIR = "learner"
LEARNER_TAG = "state"
FORMAT = 1

Resume = Literal["auto", "must", "never"]


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required, or a checkpoint that fails verification."""


@dataclass
class Checkpoint:
    path: Path
    step: int

    @property
    def learner_dir(self) -> str:
        return str(self.path / LEARNER_DIR)

    def driver_state(self) -> dict[str, Any]:
        return json.loads((self.path / DRIVER_STATE).read_text())


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoint shards and model files are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    def __init__(self, root: Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.keep = keep

    # --- writing ---------------------------------------------------------------------------

    def staging_dir(self, step: int) -> Path:
        """A fresh folder to write step `step` into; any leftover from a crashed save is removed."""
        staging = self.root / f".tmp-{step_dir_name(step)}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / LEARNER_DIR).mkdir(parents=True)
        return staging

    def commit(self, staging: Path, step: int, driver_state: dict[str, Any]) -> Checkpoint:
        """Seal a staged checkpoint (learners have written theirs): manifest, fsync, rename."""
        (staging / DRIVER_STATE).write_text(json.dumps({**driver_state, "step": step}))
        files = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            _fsync_path(path)
            rel = path.relative_to(staging).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        manifest = {"format": FORMAT, "step": step, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_path(staging / MANIFEST)
        for folder in sorted({p.parent for p in staging.rglob("*")} | {staging}):
            _fsync_path(folder)
        final = self.root / step_dir_name(step)
        if final.exists():  # a re-run of the same step after a resume: replace it whole
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_path(self.root)
        self._prune()
        return Checkpoint(final, step)

    def _prune(self) -> None:
        complete = self._candidates()
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # --- reading ---------------------------------------------------------------------------

    def _candidates(self) -> list[Path]:
        """step-* folders, oldest first (staging folders never count)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                found.append(p)
        return sorted(found, key=lambda p: int(p.name[5:]))

    @staticmethod
    def verify(path: Path) -> str | None:
        """None when the checkpoint at `path` is complete and intact, else what is wrong."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return f"{MANIFEST} missing"
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            step = int(manifest["step"])
        except (ValueError, KeyError, TypeError) as exc:
            return f"{MANIFEST} unreadable ({exc.__class__.__name__})"
        if manifest.get("format") != FORMAT:
            return f"{MANIFEST} format {manifest.get('format')!r}, expected {FORMAT}"
        if path.name != step_dir_name(step):
            return f"{MANIFEST} is for step {step}"
        if DRIVER_STATE not in files:
            return f"{DRIVER_STATE} not listed in {MANIFEST}"
        for rel, meta in files.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} missing"
            if f.stat().st_size != meta["size"]:
                return f"{rel} has {f.stat().st_size} bytes, manifest says {meta['size']}"
            if file_sha256(f) != meta["sha256"]:
                return f"{rel} checksum mismatch"
        return None

    def latest_valid(self) -> tuple[Checkpoint | None, list[str]]:
        """The newest checkpoint that verifies, and a line for each newer one that did not."""
        rejected = []
        for path in reversed(self._candidates()):
            problem = self.verify(path)
            if problem is None:
                return Checkpoint(path, int(path.name[5:])), rejected
            rejected.append(f"{path}: {problem}")
        return None, rejected

    def select(self, mode: Resume) -> Checkpoint | None:
        """The checkpoint to resume from under `mode`, or None to start fresh."""
        candidates = self._candidates()
        if mode == "never":
            if candidates:
                raise CheckpointError(
                    f"trainer.resume=never but {self.root} holds checkpoints "
                    f"({candidates[-1].name} newest); use resume=auto, or a new name/output_dir"
                )
            return None
        ckpt, rejected = self.latest_valid()
        for line in rejected:
            warnings.warn(f"rayd: skipping corrupt checkpoint {line}", stacklevel=2)
        if ckpt is not None:
            return ckpt
        if candidates:
            raise CheckpointError(
                f"checkpoints exist under {self.root} but none verifies: "
                + "; ".join(rejected)
                + " (refusing to train from scratch over them; move them away to start fresh)"
            )
        if mode == "must":
            raise CheckpointError(f"trainer.resume=must but there is no checkpoint in {self.root}")
        return None
