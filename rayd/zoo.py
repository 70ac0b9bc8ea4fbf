"""Models rayd builds itself, addressed as "tiny:<preset>" in a config.

A preset is an architecture plus an optional pre-training recipe on a built-in task. Built models
are cached under $RAYD_CACHE (default ~/.cache/rayd/models), keyed by a hash of the recipe, so a
second run (or a second process) reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rayd.models import build_tiny_llama

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
}


def cache_root() -> Path:
    return Path(os.environ.get("RAYD_CACHE", Path.home() / ".cache" / "rayd")) / "models"


def resolve_model_path(path: str, seed: int = 0) -> str:
    """A local checkpoint path stays as it is; "tiny:<preset>" is built (once) and cached."""
    if not path.startswith("tiny:"):
        return path
    name = path.removeprefix("tiny:")
    if name not in PRESETS:
        raise ValueError(f"unknown tiny model {path!r}; presets: {', '.join(sorted(PRESETS))}")
    # format: bumped when the build code changes what a recipe produces (2: lr decay in pretrain)
    recipe = {"preset": PRESETS[name], "seed": seed, "format": 2}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / f"{name}-{digest}"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private folder and rename: concurrent builders never see a half-written model.
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _build(PRESETS[name], work, seed)
        # If another process won the race, its model is identical: keep that one.
        with contextlib.suppress(OSError):
            work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(target)


def _build(preset: dict[str, Any], out: Path, seed: int) -> None:
    # transformers' save/load progress bars would print between the user's command and its
    # result (or its one-line error) the first time a preset is built.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    build_tiny_llama(out, seed=seed, **preset["arch"])
    recipe = preset.get("pretrain")
    if recipe:
        from rayd.pretrain import train_on_examples
        from rayd.tasks import make_task

        recipe = dict(recipe)
        task = make_task(recipe.pop("task"), digits=recipe.pop("digits"), seed=seed)
        examples = task.examples("train", 4000)
        print(f"rayd: building {out.name}: training on {len(examples)} task examples", flush=True)
        train_on_examples(out, examples, seed=seed, **recipe)
