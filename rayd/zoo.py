"""Models rayd builds itself, addressed as "tiny:<preset>" in a config.

A preset is an architecture plus an optional pre-training recipe on a built-in task. Built models
are cached under $RAYD_CACHE (default ~/.cache/rayd/models), keyed by a hash of the recipe, so a
second run (or a second process) reuses them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rayd.progress import duration
from rayd.staging import staged_folder

# vLLM CPU attention supports head sizes 32, 64, 80, ... only: keep hidden / heads in that set.
PRESETS: dict[str, dict[str, Any]] = {
    # The demo teacher: learns 3-digit addition with carry rationales in about 5 min on 2 cores
    # (its held-out accuracy is in the demo's report).
    "addition-teacher": {
        "arch": {"layers": 3, "hidden": 128, "heads": 4},
        "pretrain": {"task": "addition", "digits": 3, "steps": 1000, "batch_size": 64, "lr": 3e-3},
    },
    # A student about 5.6x smaller than the demo teacher, randomly initialised.
    "addition-student": {"arch": {"layers": 2, "hidden": 64, "heads": 2}, "pretrain": None},
    # Seconds to build: for tests. The teacher is briefly trained so it differs from random.
    "test-teacher": {
        "arch": {"layers": 2, "hidden": 64, "heads": 2},
        "pretrain": {"task": "addition", "digits": 2, "steps": 80, "batch_size": 32, "lr": 3e-3},
    },
    # For generate tests: trained just enough to get many 2-digit sums right, so its samples
    # are partly kept and partly dropped. (Too sharp a teacher for the on-policy e2e test's
    # 1-layer student, whose reverse KL then falls 6.7 -> 4.5 in 120 steps, not by half.)
    "test-reasoner": {
        "arch": {"layers": 2, "hidden": 64, "heads": 2},
        "pretrain": {"task": "addition", "digits": 2, "steps": 300, "batch_size": 32, "lr": 3e-3},
    },
    "test-student": {"arch": {"layers": 1, "hidden": 32, "heads": 1}, "pretrain": None},
    # The regimes world of issue 22 (docs/experiments/regimes.md): the demo teacher's arch and
    # recipe on addition whose gold rationales write each column's operands in either order
    # (swap) and state a wrong total then "!" and the right one in a tenth of the steps
    # (repair). Use it with data.task_options {digits: 3, swap: 0.5, repair: 0.1}. This recipe
    # is short for the variant, whose swapped operands make the column lookup harder: its
    # accuracy and build time are in docs/experiments/regimes.md.
    "repair-teacher": {
        "arch": {"layers": 3, "hidden": 128, "heads": 4},
        "pretrain": {
            "task": "addition",
            "task_options": {"digits": 3, "swap": 0.5, "repair": 0.1},
            "steps": 1000,
            "batch_size": 64,
            "lr": 3e-3,
        },
    },
    # The regimes world's student: one layer (0.08M params, ~10x smaller than the teacher), so
    # that it cannot simply match the teacher by imitating its greedy traces (GKD's "student too
    # small for the teacher" regime). Randomly initialised. Rationale SFT on repair-teacher's
    # verified greedy traces: 13.8% / 33.0% / 42.6% at 1000 / 2000 / 4000 steps (teacher 67%).
    "regime-student": {"arch": {"layers": 1, "hidden": 64, "heads": 2}, "pretrain": None},
    # The recipe of the portable world's teacher (rayd/world.py). Runs use the shipped build,
    # tiny:world-teacher, whose bytes are the same on every machine; this is how it was made.
    "world-teacher-recipe": {
        "arch": {"layers": 3, "hidden": 128, "heads": 4},
        "pretrain": {
            "task": "addition",
            "task_options": {"digits": 3, "slip": 0.3},
            "examples": 20000,
            "steps": 2000,
            "batch_size": 64,
            "lr": 3e-3,
        },
    },
    # The teacher of the world's new task, subtraction (the forgetting experiment of issue 37):
    # the world teacher's shape and budget on the plain subtraction task. Shipped as
    # tiny:world-subtraction-teacher.
    "world-subtraction-teacher-recipe": {
        "arch": {"layers": 3, "hidden": 128, "heads": 4},
        "pretrain": {
            "task": "subtraction",
            "task_options": {"digits": 3},
            "examples": 20000,
            "steps": 2000,
            "batch_size": 64,
            "lr": 3e-3,
        },
    },
}

# Models shipped as files (rayd/world.py): the same bytes on every machine, never rebuilt, so a
# seed in the config does not change them.
SHIPPED: dict[str, str] = {
    "world-teacher": "teacher",
    "world-student": "student",
    "world-subtraction-teacher": "subtraction-teacher",
}


def names() -> list[str]:
    """Every name a config may give as tiny:<name>."""
    return sorted([*PRESETS, *SHIPPED])


def cache_root() -> Path:
    return Path(os.environ.get("RAYD_CACHE", Path.home() / ".cache" / "rayd")) / "models"


def resolve_model_path(path: str, seed: int = 0) -> str:
    """A local checkpoint path stays as it is; "tiny:<preset>" is built (once) and cached."""
    if not path.startswith("tiny:"):
        return path
    name = path.removeprefix("tiny:")
    if name in SHIPPED:
        from rayd.world import shipped

        return shipped(SHIPPED[name])
    if name not in PRESETS:
        raise ValueError(f"unknown tiny model {path!r}; presets: {', '.join(names())}")
    return cached_build(name, PRESETS[name], seed)


def cached_build(name: str, preset: dict[str, Any], seed: int = 0) -> str:
    """The folder of `preset` built with `seed`, built on first use.

    One build per recipe, however many processes ask at once: the builder holds an exclusive
    flock on `.<folder>.lock` beside the cached folder; the others say they wait, block on the
    lock, then find the finished model. The kernel drops the lock when its holder exits or is
    killed, so a crashed build never blocks the next one (which starts over). The model is
    written to a private folder and renamed into place: a reader never sees half of one.
    """
    target = cache_target(name, preset, seed)
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(lock_path(target), name):
        if (target / "config.json").exists():
            print(f"rayd: tiny:{name}: built by another process; reusing it", file=sys.stderr)
            return str(target)
        if target.exists():  # a folder without a model there (not rayd's: renames are whole)
            shutil.rmtree(target, ignore_errors=True)
        print(
            f"rayd: building tiny:{name} (once; cached in {target.parent})",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        with staged_folder(target) as work:
            _build(name, preset, work, seed)
        print(
            f"rayd: built tiny:{name} in {duration(time.monotonic() - started)}",
            file=sys.stderr,
            flush=True,
        )
    return str(target)


def cache_target(name: str, preset: dict[str, Any], seed: int = 0) -> Path:
    """Where the build of `preset` with `seed` is cached: named by a hash of the recipe."""
    # format: bumped when the build code changes what a recipe produces (2: lr decay in pretrain)
    recipe = {"preset": preset, "seed": seed, "format": 2}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"{name}-{digest}"


def lock_path(target: Path) -> Path:
    """The lock file a build of `target` holds (kept: deleting it would let two builds in)."""
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def _build_lock(path: Path, name: str) -> Iterator[None]:
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"rayd: tiny:{name} is being built by another process; waiting for it ({path})",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(name: str, preset: dict[str, Any], out: Path, seed: int) -> None:
    # transformers' save/load progress bars would print between the user's command and its
    # result (or its one-line error) the first time a preset is built.
    from transformers.utils import logging as hf_logging

    from rayd.models import build_tiny_llama

    hf_logging.disable_progress_bar()
    build_tiny_llama(out, seed=seed, **preset["arch"])
    recipe = preset.get("pretrain")
    if recipe:
        from rayd.pretrain import train_on_examples
        from rayd.tasks import make_task

        recipe = dict(recipe)
        # A recipe names its task's options under "task_options" (as a config's data section
        # does); the older recipes' top-level "digits" stays valid, so their hashes do not move.
        options = dict(recipe.pop("task_options", {}))
        if "digits" in recipe:
            options["digits"] = recipe.pop("digits")
        task = make_task(recipe.pop("task"), seed=seed, **options)
        examples = task.examples("train", recipe.pop("examples", 4000))
        train_on_examples(out, examples, seed=seed, progress=f"building tiny:{name}", **recipe)
