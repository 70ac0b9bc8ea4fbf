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
