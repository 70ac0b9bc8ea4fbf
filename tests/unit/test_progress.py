"""rayd/progress.py: a bar in a terminal, separate plain lines with a percentage and an ETA
everywhere else (files, pipes, Ray job logs)."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import termios

from rayd.progress import Progress, duration, stage

LINE = re.compile(r"^rayd: building x: step (\d+)/100 \((\d+)%\), (\S+) left$")


def test_duration():
    assert [duration(s) for s in (0, 45, 72, 3599, 7500)] == [
        "0s",
        "45s",
        "1m12s",
        "59m59s",
        "2h05m",
    ]


def test_plain_lines_every_tenth_with_percentage_and_eta():
    out = io.StringIO()
    with Progress("building x", 100, stream=out, min_gap_s=0) as bar:
        for _ in range(100):
            bar.update()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10, lines  # one per tenth, the last one says how long it took
    for line, tenth in zip(lines[:-1], range(1, 10), strict=True):
        m = LINE.match(line)
        assert m, line
        assert int(m[1]) == 10 * tenth and int(m[2]) == 10 * tenth
    assert re.fullmatch(r"rayd: building x: step 100/100 \(100%\), done in \d+s", lines[-1])


def test_plain_lines_are_rate_limited_but_the_last_one_comes():
    out = io.StringIO()
    with Progress("building x", 100, stream=out, min_gap_s=3600) as bar:
        for _ in range(100):
            bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rayd: building x: step 100/100 (100%), done")


def test_plain_line_every_n_seconds_and_postfix():
    out = io.StringIO()
    bar = Progress("training", 1000, stream=out, every_s=0, min_gap_s=0)
    bar.set_postfix({"loss": 0.123456, "tok/s": 12})
    bar.update()
    bar.update()
    assert out.getvalue().splitlines()[1].startswith("rayd: training: step 2/1000 (0%), ")
    assert out.getvalue().splitlines()[1].endswith(" left, loss=0.1235 tok/s=12")


def test_close_early_says_where_it_stopped():
    out = io.StringIO()
    bar = Progress("training", 100, initial=20, stream=out, min_gap_s=3600)
    bar.update(5)
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rayd: training: step 25/100 (25%), ")


def test_disabled_and_unknown_total():
    out = io.StringIO()
    with Progress("x", 10, stream=out, enabled=False) as bar:
        bar.update(10)
    assert out.getvalue() == ""
    with Progress("counting", None, unit="row", stream=out, min_gap_s=0, every_s=0) as bar:
        bar.update(3)
    assert re.fullmatch(r"rayd: counting: row 3, \d+s elapsed\n", out.getvalue())


def test_terminal_gets_a_bar_not_lines():
    leader, follower = os.openpty()
    # a new pseudo-terminal is 0 columns wide: give it the size of a small window
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with os.fdopen(follower, "w") as tty:
        with Progress("building x", 100, stream=tty) as bar:
            for _ in range(100):
                bar.update()
        tty.flush()
        shown = b""
        while select.select([leader], [], [], 0.5)[0]:
            shown += os.read(leader, 65536)
    os.close(leader)
    shown = shown.decode()
    assert "\r" in shown and "100/100" in shown and "rayd: building x" in shown
    assert "left" not in shown  # tqdm's own ETA, not the plain lines


def test_stage_lines():
    out = io.StringIO()
    with stage("generating rationales", stream=out):
        pass
    assert out.getvalue().splitlines()[0] == "rayd: generating rationales ..."
    assert re.fullmatch(
        r"rayd: generating rationales: done in \d+s", out.getvalue().splitlines()[1]
    )
