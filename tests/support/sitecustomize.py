"""Test-only hooks inside the processes of a rayd run that a test starts as a subprocess.

A test puts this folder first on the subprocess's PYTHONPATH; Python then imports this module at
start-up, in the driver and in every Ray worker process, since the workers of the local Ray
cluster that the driver starts inherit its environment. Nothing here ships with the package, and
nothing happens unless a hook's variable is set.

RAYD_TEST_HOLD_MID_ACCUMULATION="STEP:FILE" (tests/e2e/test_resume_points.py): after the backward
of the first micro-batch of optimizer step STEP (grad_accum > 1), learner rank 0 writes FILE and
every rank waits there until FILE is removed (10 minutes at most), so the test can signal the
driver while the learners are provably between two micro-batches. It wraps DeepSpeed's
`DeepSpeedEngine.backward` once `deepspeed.runtime.engine` is imported.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HOLD_MID_ACCUMULATION = "RAYD_TEST_HOLD_MID_ACCUMULATION"


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the module `name` is first executed."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the finders below locate the module itself
        for finder in sys.meta_path:
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                loader.exec_module = self._then_patch(loader.exec_module)  # type: ignore[method-assign]
                return spec
        return None

    def _then_patch(
        self, exec_module: Callable[[ModuleType], None]
    ) -> Callable[[ModuleType], None]:
        def exec_then_patch(module: ModuleType) -> None:
            exec_module(module)
            self.patch(module)

        return exec_then_patch


def _hold(step: int) -> None:
    import torch.distributed as dist

    spec = os.environ[HOLD_MID_ACCUMULATION]
    if int(spec.partition(":")[0]) != step:
        return
    marker = Path(spec.partition(":")[2])
    if dist.get_rank() == 0:
        marker.write_text(f"{step}\n")
    dist.barrier()  # every rank sees FILE before any waits on it
    deadline = time.monotonic() + 600
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _hold_mid_accumulation(engine_module: ModuleType) -> None:
    engine_class = engine_module.DeepSpeedEngine
    backward = engine_class.backward

    def backward_then_hold(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = backward(self, *args, **kwargs)
        accum = self.gradient_accumulation_steps()
        # step() counts micro-steps, so a multiple of grad_accum here is a step's first one.
        if accum > 1 and self.micro_steps % accum == 0:
            _hold(self.global_steps + 1)
        return out

    engine_class.backward = backward_then_hold


if os.environ.get(HOLD_MID_ACCUMULATION):
    sys.meta_path.insert(0, _AfterImport("deepspeed.runtime.engine", _hold_mid_accumulation))
