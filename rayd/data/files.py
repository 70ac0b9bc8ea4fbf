"""Text data files read defensively: every JSONL (or one-prompt-a-line) file rayd reads goes
through `read_text_lines`, which refuses, in one line naming the file (and the line), what would
otherwise end in a traceback or a misleading error later: a folder where a file belongs, a file
too large to read whole, bytes that are not UTF-8, control characters, and lines too long to be
a prompt. The bounds hold before anything is parsed or tokenised.

    RAYD_MAX_DATA_FILE_BYTES   largest data file read (default 4 GiB)
    RAYD_MAX_DATA_LINE_CHARS   longest line (default 4 Mi characters)
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_FILE_BYTES = 4 << 30
MAX_LINE_CHARS = 4 << 20
# C0 control characters and DEL: never part of text a prompt holds. A tab is text, and the
# carriage return of a CRLF line end is dropped before the check.
_CONTROL = {chr(c) for c in range(0x20) if chr(c) != "\t"} | {"\x7f"}


class DataFileError(ValueError):
    """A data file that cannot be read as text lines; the message is one line."""


def _bound(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise DataFileError(f"{name}={text!r}: expected a whole number") from None
    if value < 1:
        raise DataFileError(f"{name}={text!r}: expected a positive number")
    return value


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    size, units = n / 1024, ["KiB", "MiB", "GiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{size:.1f} {units[0]}"


def _char_name(ch: str) -> str:
    name = {"\x00": "NUL", "\x1b": "ESC", "\x7f": "DEL", "\r": "CR", "\x0c": "form feed"}.get(ch)
    return f"U+{ord(ch):04X}" + (f" ({name})" if name else "")


def read_text_lines(path: Path, key: str, what: str = "a JSONL file") -> list[str]:
    """The lines of the UTF-8 text file `path` (`key`: the setting that named it, for the
    messages; `what`: what the file should be). Lines end at "\\n" only (a JSON string may
    hold U+2028), a CRLF's "\\r" and a leading byte-order mark are dropped. Raises
    `DataFileError` (one line) for a folder, a missing or unreadable file, one above
    RAYD_MAX_DATA_FILE_BYTES, bytes that are not UTF-8, a control character (NUL, ESC, ...)
    or a line above RAYD_MAX_DATA_LINE_CHARS."""
    path = Path(path)
    if path.is_dir():
        raise DataFileError(f"{key}: {str(path)!r} is a folder; expected {what}")
    if not path.exists():
        raise DataFileError(f"{key}: {str(path)!r} does not exist")
    max_bytes = _bound("RAYD_MAX_DATA_FILE_BYTES", MAX_FILE_BYTES)
    max_chars = _bound("RAYD_MAX_DATA_LINE_CHARS", MAX_LINE_CHARS)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataFileError(
                f"{key}: {path}: {_human(size)}, more than the {_human(max_bytes)} a data file "
                "may have (RAYD_MAX_DATA_FILE_BYTES); split it or raise the bound"
            )
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # a file that grew since stat() stops here too
    except OSError as exc:
        raise DataFileError(f"{key}: {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise DataFileError(
            f"{key}: {path}: more than the {_human(max_bytes)} a data file may have "
            "(RAYD_MAX_DATA_FILE_BYTES); split it or raise the bound"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFileError(
            f"{key}: {path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line_no, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = lines[line_no - 1] = line[:-1]
        if len(line) > max_chars:
            raise DataFileError(
                f"{key}: {path}:{line_no}: a line of {len(line)} characters, more than the "
                f"{max_chars} a data line may have (RAYD_MAX_DATA_LINE_CHARS)"
            )
        if not _CONTROL.isdisjoint(line):
            col = next(i for i, ch in enumerate(line) if ch in _CONTROL)
            raise DataFileError(
                f"{key}: {path}:{line_no}: control character {_char_name(line[col])} at "
                f"column {col + 1}; a data line holds text only (in JSON, escape it as "
                f"\\u{ord(line[col]):04x})"
            )
    return lines
