"""Folders written whole or not at all: each is written into a staging folder beside its
destination and renamed into place when it is complete, so a crash or an error part-way never
leaves a half-written model or export that a later command would take as finished."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A fresh folder to write `out` in: on leaving the block it replaces `out` (a folder
    already there is removed first), unless the block raised; the staging folder is removed
    either way. It sits beside `out` (same file system, so the rename is one step)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def refuse_to_replace(out: Path, marker: str, what: str, inputs: dict[str, Path]) -> str | None:
    """Why `out` may not be written (replaced), or None when it may: it must not be a file, nor
    hold any of `inputs` (name -> path: a dataset, a run read by the same command), and a folder
    already there must be empty or hold `marker`, the file rayd writes into every folder of this
    kind (`what`, e.g. "a rayd export") it makes. rayd replaces only what it made."""
    if out.exists() and not out.is_dir():
        return f"{str(out)!r} is a file; give a folder"
    o = out.resolve()
    for name, path in inputs.items():
        p = path.resolve()
        if o == p or o in p.parents:
            return (
                f"{str(out)!r} holds {name} ({path}), which this command reads; give another folder"
            )
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        return (
            f"{str(out)!r} is not empty and is not {what} (no {marker} in it); "
            "rayd replaces only its own folders: give another folder, or empty this one"
        )
    return None
