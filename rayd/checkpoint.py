"""Resumable checkpoints: atomic, verifiable, the last K kept.

Layout under `<run>/checkpoints/`:
    step-000040/
        learner/...        DeepSpeed's files (model, optimizer and ZeRO shards, LR schedule)
        driver.json        step, weight version, prompt-sampler cursor, driver RNG state
        MANIFEST.json      every other file with its size and sha256; written last
A checkpoint is written into `.tmp-step-000040/`, every file fsynced, the manifest added, and
only then renamed into place, so a crash mid-save leaves a `.tmp-*` folder that is never read.
It is sealed only when every learner rank's files are there (`rank_files`): a rank that wrote
elsewhere (storage not shared between nodes) or did not finish fails the save, not the resume.
Old checkpoints are deleted only after a new one is complete, and a full disk during a save
is one line (`CheckpointError`) with the staging folder removed and the older ones intact.

Loading walks from the newest checkpoint down and takes the first whose manifest verifies; a
corrupt one is reported with what is wrong and skipped. `resume=auto` refuses to start from
scratch when checkpoints exist but none verifies (DeepSpeed's load_checkpoint without a `latest`
tag returns (None, None) with a warning, and OpenRLHF and verl then train from scratch). Every
learner must see this folder: one machine, or shared storage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


def learner_rank_files(num_learners: int, zero_stage: int) -> list[str]:
    """The files each learner rank writes itself into a checkpoint, relative to its folder:
    rayd's RNG state (written after that rank's DeepSpeed save returned) and, with ZeRO, the
    rank's optimizer partition (DeepSpeed's file name)."""
    files = []
    for rank in range(num_learners):
        files.append(f"{LEARNER_DIR}/{LEARNER_TAG}/rng_rank{rank}.pt")
        if zero_stage >= 1:
            files.append(
                f"{LEARNER_DIR}/{LEARNER_TAG}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            )
    return files


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

    def commit(
        self,
        staging: Path,
        step: int,
        driver_state: dict[str, Any],
        rank_files: Sequence[str] = (),
    ) -> Checkpoint:
        """Seal a staged checkpoint (learners have written theirs): manifest, fsync, rename.
        `rank_files`: paths under the staging folder that must exist (each learner rank's own
        files, `learner_rank_files`), else nothing is sealed. A full disk (ENOSPC) or a missing
        rank file removes the staging folder and raises `CheckpointError`; the checkpoints
        already there are untouched."""
        try:
            missing = [rel for rel in rank_files if not (staging / rel).is_file()]
            if missing:
                raise CheckpointError(
                    f"checkpoint of step {step} not sealed: {', '.join(missing)} missing under "
                    f"{staging} (every learner rank must write into this folder: one machine, "
                    "or storage shared by every node)"
                )
            return self._seal(staging, step, driver_state)
        except OSError as exc:
            raise self.write_failed(step, exc) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone once renamed; else a leftover

    def write_failed(self, step: int, exc: OSError) -> CheckpointError:
        """What a failed checkpoint write says: disk full in one line, naming what survives.
        `exc` may be a learner's, raised again by Ray (the original is its `cause`)."""
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, OSError) else exc
        kept = self._candidates()
        survives = f"the checkpoint of {kept[-1].name} is intact" if kept else "no older one"
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return CheckpointError(
            f"{reason} while writing the checkpoint of step {step} under {self.root} "
            f"({survives}); free space and run the same command again to resume"
        )

    def _seal(self, staging: Path, step: int, driver_state: dict[str, Any]) -> Checkpoint:
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
        # A re-run of the same step after a resume replaces it whole, and the old one is moved
        # aside, not deleted, until the new one is in place: a failure between keeps one.
        old = self.root / f".old-{step_dir_name(step)}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError:
            if old.exists() and not final.exists():
                os.rename(old, final)
            raise
        _fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)
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

    def _recover_moved_aside(self) -> None:
        """A step re-saved by a process killed between its two renames: the old checkpoint
        was moved aside (`.old-step-*`) and the new one not yet in place; put the old back."""
        if not self.root.is_dir():
            return
        for old in self.root.glob(".old-step-*"):
            final = self.root / old.name.removeprefix(".old-")
            if not final.exists():
                os.rename(old, final)

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
        self._recover_moved_aside()
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


# --- Loading untrusted files ----------------------------------------------------------------


def safe_torch_load(path: str | os.PathLike[str], map_location: Any = "cpu", **kwargs: Any) -> Any:
    """`torch.load` that runs no code from the file: tensors, containers and plain values only
    (`weights_only=True`), plus the three DeepSpeed classes its checkpoints hold (a loss
    scaler, the ZeRO stage enum, a fragment address), which are rebuilt field by field and
    never called. A file that needs anything else is refused in one line."""
    import torch

    return _load_weights_only(torch.load, path, map_location, **kwargs)


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` in the block loads as `safe_torch_load` does, whatever its caller
    asks for: for library code that unpickles (DeepSpeed's zero_to_fp32)."""
    import torch

    original = torch.load

    def load(f: Any, map_location: Any = None, *, weights_only: Any = None, **kw: Any) -> Any:
        return _load_weights_only(original, f, map_location, **kw)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _load_weights_only(load: Any, path: Any, map_location: Any, **kwargs: Any) -> Any:
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        found = str(exc).split("GLOBAL ", 1)[-1].split(" ", 1)[0] if "GLOBAL " in str(exc) else ""
        what = f" (it holds {found})" if found else ""
        raise CheckpointError(
            f"{path}: refused to load: it needs Python objects beyond tensors and plain "
            f"values{what}, which could run code; rayd loads checkpoints with "
            "weights_only=True (docs/reliability.md, 'Trusted files')"
        ) from None


def _deepspeed_globals() -> list[Any]:
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # export of a run without DeepSpeed installed: plain files only
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]
