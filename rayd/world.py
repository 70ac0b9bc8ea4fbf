"""The portable world of issue 37: a teacher and a start student shipped as files, not rebuilt.

Building a tiny model from its recipe gives different weights on different CPUs (one recipe
and seed gave a 67% teacher on an AMD EPYC and a 91% one on an Intel Xeon:
docs/experiments/regimes.md), so results in a built world hold for one machine only. This world's
models are built once and shipped in rayd/worlds/addition/ with the sha256 of every file in
MANIFEST.json; a config names them as "tiny:world-teacher" and "tiny:world-student", and each
use checks the bytes first. How they were made and what they measure is in
docs/experiments/world.md (`python -m rayd.commands.bench.world`).

The world:
- the task: 3-digit addition with the carry rationale (`task:addition`, digits 3), whose gold
  rationale of a pair is unique;
- the teacher (0.81M parameters): trained on that task with `slip` 0.3 (a digit written wrong,
  "!", the right digit, in three column steps of ten), the wrong digits masked out of its loss:
  it flags and rewrites every kind of slip and never makes one;
- the start student (a smaller model): rationale SFT on fresh clean traces to its plateau, so it
  is competent (the literature's on-policy regime) and still below the teacher;
- the new task of the forgetting experiment, 3-digit subtraction by a borrow rationale
  (`task:subtraction`), and its teacher (the teacher's shape, trained on it), added after the
  rest and leaving their bytes as they were.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

WORLD_DIR = Path(__file__).parent / "worlds" / "addition"
MANIFEST = WORLD_DIR / "MANIFEST.json"
ROLES = ("teacher", "student", "subtraction-teacher")
# Data options of the world's runs: the plain task, so gold completions are the clean traces.
TASK_OPTIONS: dict[str, Any] = {"digits": 3}


class WorldError(ValueError):
    """A shipped model is missing or its bytes are not the ones recorded."""


def digests(folder: Path) -> dict[str, str]:
    """The sha256 of each file of `folder` (names relative to it, sorted)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def manifest() -> dict[str, Any]:
    if not MANIFEST.is_file():
        raise WorldError(f"{MANIFEST}: the world's manifest is missing (a partial checkout?)")
    return json.loads(MANIFEST.read_text())


@functools.cache
def shipped(role: str) -> str:
    """The folder of the shipped `role` model, after checking every file's sha256 (once per
    process: the check reads a few MB)."""
    if role not in ROLES:
        raise WorldError(f"the world has no {role!r} model; it has {', '.join(ROLES)}")
    folder = WORLD_DIR / role
    expected = manifest()[role]["files"]
    if not folder.is_dir():
        raise WorldError(f"{folder}: the world's {role} is missing (a partial checkout?)")
    found = digests(folder)
    if found != expected:
        names = expected.keys() | found.keys()
        changed = sorted(n for n in names if found.get(n) != expected.get(n))
        raise WorldError(
            f"{folder}: the world's {role} differs from {MANIFEST.name} in {', '.join(changed)}; "
            "these files must be the shipped bytes (git checkout them, or rebuild the world "
            "with python -m rayd.commands.bench.world build and publish its new measurements)"
        )
    return str(folder)
