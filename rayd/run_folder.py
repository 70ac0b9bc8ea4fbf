"""One process at a time in a run folder (or a sweep folder): an advisory lock on the folder.

Two runs writing one `output_dir` would delete each other's checkpoint staging and interleave
metrics.jsonl; the second is refused in one line instead. The lock is `flock` on the folder's
own descriptor, so it creates no file, and the kernel drops it when the process ends however it
ends (a SIGKILL leaves no stale lock to clean up). `flock` holds on one machine and on most
shared file systems that support it (NFSv4, Lustre with flock enabled); docs/reliability.md says
so. A folder this process created and left empty because a check failed is removed again, so a
run that fails before training leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rayd.config import ConfigError
from rayd.staging import output_parent_problem


class FolderBusy(ConfigError):
    """Another rayd process holds this folder."""


@contextmanager
def locked_folder(
    folder: Path, error: str = "config error", holder: str = "rayd run"
) -> Iterator[int]:
    """Hold `folder` (created if missing) for the block, or raise `FolderBusy` at once. Yields
    the locked descriptor: a child process given it (`pass_fds`) holds the lock with this one,
    until both have ended. `error` and `holder` word the refusals ("sweep error", "rayd
    ablate")."""
    folder = Path(folder)
    problem = output_parent_problem(folder)  # a file there, or under a file, or not writable
    if problem:
        raise ConfigError(f"{error}: output_dir: {problem}")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ConfigError(
            f"{error}: output_dir: cannot create {str(folder)!r} ({exc.strerror})"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(
                f"{error}: {folder} is in use by another {holder} (it holds the folder's "
                "lock); wait for it to end, or give another name/output_dir"
            ) from None
        except OSError as exc:  # ENOLCK: a file system without flock
            raise ConfigError(
                f"{error}: output_dir: cannot lock {str(folder)!r} ({exc.strerror}); this file "
                "system does not support flock (docs/reliability.md, 'Run folders')"
            ) from None
        try:
            yield fd
        finally:
            if created and not any(folder.iterdir()):
                folder.rmdir()
    finally:
        os.close(fd)  # releases the lock (unless a child still holds it)
