"""`rayd COMMAND --help` and a config error answer without importing the heavy stack (torch, Ray,
vLLM, transformers, DeepSpeed): each command parses its arguments and checks its config first.
Checked by what is imported (sys.modules in a fresh interpreter), not by timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rayd.cli import COMMANDS, main

HEAVY = ("torch", "ray", "vllm", "transformers", "deepspeed", "datasets")

# Runs `python -m rayd ARGV...` in this interpreter, then prints the heavy modules it imported.
PROBE = """
import json, runpy, sys
sys.argv = ["rayd", *json.loads(sys.argv[1])]
try:
    runpy.run_module("rayd", run_name="__main__")
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def imported_by(argv: list[str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_imports_no_heavy_module(command: str) -> None:
    assert imported_by([command, "--help"]) == []


@pytest.mark.parametrize("command", ["train", "generate", "score"])
def test_a_missing_config_imports_no_heavy_module(command: str) -> None:
    assert imported_by([command, "nope.yaml"]) == []


def test_a_mistyped_command_gets_the_nearest(capsys) -> None:
    assert main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == "rayd: unknown command 'trian'; did you mean 'train'?"
    assert main(["fly"]) == 2
    assert capsys.readouterr().err.strip() == "rayd: unknown command 'fly'"
