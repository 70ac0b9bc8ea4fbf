"""Progress of a long stage: a tqdm bar in a terminal, periodic plain lines everywhere else.

A bar written to a file (Ray job logs, CI, `> log`) is one giant line of carriage returns, so
when the stream is not a terminal `Progress` prints separate lines instead, such as

    rayd: building addition-teacher: step 400/1000 (40%), 1m12s left

one each time another tenth is done or `every_s` seconds have passed (whichever comes first),
never more often than every `min_gap_s` seconds, and a last line when it closes. `stage` frames
a stage without a count: a line when it starts and one with its wall time when it ends.

Imports only tqdm and the standard library: commands import it before the heavy stack.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm


def duration(seconds: float) -> str:
    """45s, 1m12s, 2h05m."""
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """`update(n)` as work gets done, `set_postfix({...})` for a few live numbers, `close()`
    (or use it as a context manager). `enabled=False` shows nothing."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        unit: str = "step",
        initial: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        every_s: float = 60.0,
        min_gap_s: float = 5.0,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n = self._start = initial
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.every_s, self.min_gap_s = every_s, min_gap_s
        self.postfix: dict[str, str] = {}
        self._t0 = self._last = time.monotonic()
        self._shown_n = initial  # the count of the last plain line
        self._shown_tenth = self._tenth(initial)
        self._closed = False
        self._bar = None
        if enabled and is_terminal(self.stream):
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=f"rayd: {desc}",
                unit=unit,
                file=self.stream,
                dynamic_ncols=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            since = now - self._last
            due = self._tenth(self.n) > self._shown_tenth or since >= self.every_s
            if self.total is not None and self.n >= self.total:
                self._line(now)  # the last line: how long it took
            elif due and since >= self.min_gap_s:
                self._line(now)

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        self.postfix = {
            k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()
        }
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def _line(self, now: float) -> None:
        elapsed = now - self._t0
        done = self.n - self._start
        text = f"rayd: {self.desc}: {self.unit} {self.n}"
        if self.total:
            text += f"/{self.total} ({100 * self.n // self.total}%)"
            if self.n >= self.total:
                text += f", done in {duration(elapsed)}"
            elif done > 0:
                text += f", {duration(elapsed / done * (self.total - self.n))} left"
            else:
                text += ", time left unknown"
        else:
            text += f", {duration(elapsed)} elapsed"
        if self.postfix:
            text += ", " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        print(text, file=self.stream, flush=True)
        self._last, self._shown_n, self._shown_tenth = now, self.n, self._tenth(self.n)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n != self._shown_n:
            self._line(time.monotonic())  # where it stopped (finished, preempted or failed)


@contextmanager
def stage(desc: str, stream: TextIO | None = None) -> Iterator[None]:
    """`rayd: DESC ...` when a stage starts, `rayd: DESC: done in 1m12s` when it ends. An
    error goes on up with nothing added: the command prints its own one line."""
    out = stream if stream is not None else sys.stderr
    print(f"rayd: {desc} ...", file=out, flush=True)
    t0 = time.monotonic()
    yield
    print(f"rayd: {desc}: done in {duration(time.monotonic() - t0)}", file=out, flush=True)
