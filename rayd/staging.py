"""Folders written whole or not at all: each is written into a staging folder beside its
destination and renamed into place when it is complete, so a crash or an error part-way never
leaves a half-written model or export that a later command would take as finished.

SIGTERM is part of that promise: a command that writes (generate, score, export) runs under
`terminate_as_exception`, which turns the signal into `Terminated` in the main thread, so the
`finally:` blocks that remove staging folders run before the process ends with 143; the short
step that swaps a staged folder into place runs with SIGTERM held (`sigterm_held`), so it is
never cut in half."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import BinaryIO

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a process SIGTERM ended


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread where the program was when it came: `finally:` blocks
    run on the way out (a SystemExit, so no `except Exception:` swallows it)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + signum)
        self.signum = signum


_armed = 0  # how many terminate_as_exception blocks are open (nested commands: demo, tests)
_held = 0  # how many sigterm_held blocks are open
_pending: int | None = None  # a SIGTERM that came while held
_fired = False


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    global _fired, _pending
    if _fired:  # a second SIGTERM while the first one's clean-up runs: let it finish
        return
    if _held:  # inside sigterm_held: raised when the block ends
        _pending = signum
        return
    _fired = True
    raise Terminated(signum)


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (see the module doc). Outside the main
    thread signals cannot be caught, and the block changes nothing."""
    global _armed, _fired, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _armed += 1
    if _armed == 1:
        _fired, _pending = False, None
    try:
        yield
    finally:
        _armed -= 1
        signal.signal(signal.SIGTERM, previous)


def rearm_terminate() -> None:
    """Install the handler again inside a `terminate_as_exception` block: `ray.init` replaces
    the process's SIGTERM handler with its own (a bare sys.exit(15)); call this after it."""
    if _armed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextmanager
def sigterm_held() -> Iterator[None]:
    """A SIGTERM that comes during the block raises `Terminated` only when the block ends: for
    the few steps (remove the old folder, rename the new one) that must happen together or not
    at all. (Without `terminate_as_exception`, SIGTERM ends the process as it always does.)"""
    global _held, _pending, _fired
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            signum, _pending = _pending, None
            _fired = True
            raise Terminated(signum)


def write_atomic(path: Path, content: str | Callable[[BinaryIO], object]) -> None:
    """`path` written whole or not at all: `content` (text, or a function that writes to the
    binary file) goes to a temporary file beside it, fsynced and renamed over it. An error or a
    SIGTERM (`Terminated`) part-way leaves `path` as it was and no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as fh:
            if isinstance(content, str):
                fh.write(content.encode("utf-8"))
            else:
                content(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_parent_problem(out: Path) -> str | None:
    """Why a folder cannot be written at `out`, found before any work: the nearest existing
    folder on its path must be a folder (not a file) that this user may write in."""
    for p in (out, *out.parents):
        if p.exists():
            if p == out and not p.is_dir():
                return f"{str(out)!r} is a file, not a folder"
            if not p.is_dir():
                return f"{str(p)!r} is a file, so {str(out)!r} cannot be a folder"
            if not os.access(p, os.W_OK | os.X_OK):
                return f"{str(p)!r} is not writable, so {str(out)!r} cannot be written"
            return None
    return None


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A fresh folder to write `out` in: on leaving the block it replaces `out`, unless the
    block raised; the staging folder is removed either way. It sits beside `out` (same file
    system, so the rename is one step). A folder already at `out` is moved aside first and
    deleted only once the new one is in place; a swap that fails half-way puts it back."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    old = out.with_name(f".{out.name}.old")
    try:
        yield staging
        shutil.rmtree(old, ignore_errors=True)
        with sigterm_held():  # the earlier folder moved aside and the new one in, or neither
            if out.exists():
                os.replace(out, old)
            os.replace(staging, out)
    finally:
        if old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(old, ignore_errors=True)
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
