"""What ruff cannot see: service/ behaves the same under `python -O`, and only the CLI's output
module writes to the terminal."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"
# The CLI's output module, and the log handler (log lines go to stderr by design).
WRITERS = {SERVICE / "ops" / "output.py", SERVICE / "core" / "logs.py"}


def modules() -> list[tuple[Path, ast.Module]]:
    found = [(path, ast.parse(path.read_text(), str(path))) for path in SERVICE.rglob("*.py")]
    assert len(found) > 40  # the walk found the package
    return found


def test_service_has_no_assert_statement_so_python_O_changes_nothing() -> None:
    asserts = [
        f"{path.relative_to(SERVICE.parent)}:{node.lineno}"
        for path, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Assert)
    ]
    assert asserts == []


def test_only_the_output_module_and_the_log_handler_touch_stdout_or_stderr() -> None:
    touching = [
        f"{path.relative_to(SERVICE.parent)}:{node.lineno}"
        for path, tree in modules()
        if path not in WRITERS
        for node in ast.walk(tree)
        if (isinstance(node, ast.Attribute) and node.attr in {"stdout", "stderr", "__stdout__"})
        or (isinstance(node, ast.Name) and node.id == "print")
    ]
    assert touching == []
