"""The package's layering: the core (everything in rayd/ outside rayd/commands/) never imports a
command module; commands import the core. (rayd/cli.py names the commands as strings and
imports the chosen one at run time, which is not an import of the core.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rayd"


def commands_imported(source: str, package: str) -> list[str]:
    """The imports of rayd.commands (absolute or relative) in `source`, the text of a module of
    `package` (dotted, e.g. "rayd.learner"), as 'line N: ...'."""
    parts = package.split(".")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = parts[: len(parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(n == "rayd.commands" or n.startswith("rayd.commands.") for n in names):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def core_modules() -> list[Path]:
    commands = PACKAGE / "commands"
    return sorted(p for p in PACKAGE.rglob("*.py") if commands not in p.parents)


def package_of(path: Path) -> str:
    return ".".join(path.parent.relative_to(PACKAGE.parent).parts)


def test_the_core_never_imports_a_command() -> None:
    modules = core_modules()
    assert PACKAGE / "cli.py" in modules and PACKAGE / "commands" / "score.py" not in modules
    bad = {
        str(p.relative_to(PACKAGE.parent)): hits
        for p in modules
        if (hits := commands_imported(p.read_text(), package_of(p)))
    }
    assert not bad, f"the core imports rayd.commands: {bad}"


@pytest.mark.parametrize(
    ("source", "package"),
    [
        ("import rayd.commands.score\n", "rayd"),
        ("from rayd.commands.score import main\n", "rayd"),
        ("from rayd.commands import bench\n", "rayd"),
        ("from rayd import commands\n", "rayd"),
        ("def f():\n    from rayd.commands.eval import pass_at_k\n", "rayd"),
        ("from ..commands import eval\n", "rayd.teacher"),
        ("from .commands.score import main\n", "rayd"),
    ],
)
def test_the_check_sees_every_form_of_import(source: str, package: str) -> None:
    assert commands_imported(source, package)


@pytest.mark.parametrize(
    ("source", "package"),
    [
        ("from rayd.teacher.stored import StoredSignal\n", "rayd"),
        ("import rayd.commandsx\n", "rayd"),
        ('COMMANDS = {"eval": ("rayd.commands.eval", "accuracy")}\n', "rayd"),
        ("from .stored import load_stored_signal\n", "rayd.teacher"),
    ],
)
def test_the_check_lets_the_rest_through(source: str, package: str) -> None:
    assert not commands_imported(source, package)
