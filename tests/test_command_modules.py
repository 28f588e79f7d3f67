"""The command rule: ``python -m pipeline.<verb>`` modules are thin, and no module imports one.

A command module is one that runs as a program (``if __name__ == "__main__"``). What two commands
share lives in a library module, so a command can change without breaking another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
MODULES = sorted(p for p in PIPELINE.rglob("*.py"))
MAX_COMMAND_LINES = 200


def module_name(path: Path) -> str:
    parts = path.relative_to(PIPELINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_command(path: Path) -> bool:
    return '__name__ == "__main__"' in path.read_text()


COMMANDS = {module_name(p) for p in MODULES if is_command(p)}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_commands_are_found():
    assert {
        "pipeline.train",
        "pipeline.tune",
        "pipeline.translate",
        "pipeline.evaluate",
    } <= COMMANDS
    assert "pipeline.training" not in COMMANDS and "pipeline.flags" not in COMMANDS


def test_the_rule_sees_an_import_of_a_command(tmp_path):
    source = tmp_path / "lib.py"
    source.write_text("from pipeline.train import main\nimport pipeline.tune\n")
    assert {"pipeline.train", "pipeline.tune"} <= imported(source) & COMMANDS


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_a_command(path):
    own = module_name(path)
    # A command package (pipeline.bench) may import its own submodules.
    offending = {m for m in imported(path) & COMMANDS if not m.startswith(own + ".")}
    offending.discard(own)
    assert not offending, f"{own} imports the command module(s) {sorted(offending)}"


@pytest.mark.parametrize(
    "path", [p for p in MODULES if is_command(p)], ids=lambda p: module_name(p)
)
def test_commands_are_thin(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_COMMAND_LINES, f"{module_name(path)} has {lines} lines"
