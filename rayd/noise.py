"""Library messages a rayd user cannot act on, kept out of the console and of job logs.

Every rayd process (the driver, every rayd actor as it starts, and on a joined cluster every Ray
worker, through `worker_runtime_env`) demotes a short list of known warnings from vLLM,
DeepSpeed and Ray to DEBUG: they are not printed at the usual levels, and come back with
`VLLM_LOGGING_LEVEL=DEBUG` (vLLM's) or a DEBUG level on the library's logger. Only messages
listed here are touched, and nothing at ERROR or above; any other warning still shows. The
`torch.distributed` deprecation FutureWarnings raised inside vLLM and DeepSpeed are ignored the
same way (`python -W default` shows them). Worker progress bars of transformers and the Hub are
turned off (a bar in a log is one long line).

Imports only the standard library: Ray imports it in every worker it starts.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Logger name (the emitting module) -> parts of the messages demoted there.
DEMOTED: dict[str, tuple[str, ...]] = {
    # vLLM on CPU: the seed rayd sets on purpose, the eager mode rayd asks for, the missing
    # Triton CPU backend and LD_PRELOAD tuning libraries, torch thread counts it pins itself.
    # Chunked prefill off on CPU (rayd.rollout.vllm_engine.build_llm): vLLM's generic caution;
    # rayd's engine tests check sampling and scoring against transformers with it off.
    "vllm.engine.arg_utils": (
        "The global random seed is set to",
        "This model does not officially support disabling chunked prefill",
    ),
    "vllm.config.vllm": (
        "Enforce eager set, disabling torch.compile",
        "Inductor compilation was disabled by user settings",
        "Model Runner V2 requires Triton; using the V1 model runner",
    ),
    "vllm.platforms.cpu": (
        "Triton is not installed. triton-cpu is expected",
        # on CPUs with AVX-512 BF16, for every model, mamba or not
        "Reset SSM cache type to float32",
    ),
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    "vllm.v1.worker.cpu_worker": (
        "libtcmalloc is not found in LD_PRELOAD",
        "libiomp is not found in LD_PRELOAD",
        "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding",
    ),
    # DeepSpeed on a machine without an accelerator: CPU is what rayd asked for.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # A local Ray started by rayd: token authentication on by default is Ray's own notice.
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster",
    ),
}

# FutureWarnings from torch.distributed's deprecated names, called by vLLM and DeepSpeed.
FUTURE_WARNINGS = r"`torch\.distributed\.\w+` is deprecated"

# Environment of every Ray worker a rayd run starts (a value the user set wins).
WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class DemoteKnownNoise(logging.Filter):
    """On a logger: a record whose message contains one of `parts` becomes a DEBUG record,
    dropped unless that logger is enabled for DEBUG."""

    def __init__(self, parts: tuple[str, ...]) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.WARNING <= record.levelno < logging.ERROR:
            try:
                message = record.getMessage()
            except (TypeError, ValueError):
                return True
            if any(part in message for part in self.parts):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                # shown only where the library's logger is set to DEBUG
                return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quiet_known_noise() -> None:
    """Demote the known messages in this process (idempotent). Also Ray's
    `worker_process_setup_hook` of every worker rayd starts."""
    for name, parts in DEMOTED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DemoteKnownNoise) for f in logger.filters):
            logger.addFilter(DemoteKnownNoise(parts))
    warnings.filterwarnings("ignore", message=FUTURE_WARNINGS, category=FutureWarning)


@contextmanager
def worker_environ() -> Iterator[None]:
    """WORKER_ENV (a value the user set wins) in this process's environment for the block: a
    local Ray started inside it passes it on to every worker; then the environment is as it
    was."""
    added = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def worker_runtime_env(taken: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job-level Ray runtime env of a rayd run on a cluster it joins (RAY_ADDRESS, `ray job
    submit`): the setup hook above and WORKER_ENV; a local Ray gets them by `worker_environ`
    and `rayd.device.prepare_process` instead.
    `taken` is a runtime env already in force (a submitted job's): what it sets is left to it
    (Ray refuses to merge two values for one field or variable)."""
    taken = taken or {}
    taken_vars = taken.get("env_vars") or {}
    env_vars = {k: v for k, v in WORKER_ENV.items() if k not in os.environ and k not in taken_vars}
    out: dict[str, Any] = {}
    if env_vars:
        out["env_vars"] = env_vars
    if "worker_process_setup_hook" not in taken:
        out["worker_process_setup_hook"] = "rayd.noise.quiet_known_noise"
    return out
