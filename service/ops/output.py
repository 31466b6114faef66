"""What the CLI writes to the terminal, and the only module in service/ that does.

Results go to stdout, one line each, where scripts and tests parse them; progress and advice
go to stderr so a pipe holds results only. ruff's T20 keeps `print` out of the rest of
service/ (tests/test_lint_guards.py keeps `sys.stdout` and `sys.stderr` out too).
"""

from __future__ import annotations

import sys
from typing import NoReturn


def say(text: str = "", *, flush: bool = False) -> None:
    """One result line on stdout."""
    sys.stdout.write(text + "\n")
    if flush:
        sys.stdout.flush()


def write(text: str) -> None:
    """Text on stdout as it is (a document that carries its own newlines)."""
    sys.stdout.write(text)


def note(text: str = "") -> None:
    """One line for the operator on stderr (an empty one ends a progress bar)."""
    sys.stderr.write(text + "\n")


def progress(done: int, total: int, aside: str = "") -> None:
    """Redraw a progress bar in place on stderr; `note()` ends it."""
    width = 30
    filled = width * done // max(total, 1)
    line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    if aside:
        line += f" ({aside})"
    sys.stderr.write(line)
    sys.stderr.flush()


def fail(message: str) -> NoReturn:
    """Stop the command: `message` on stderr, exit status 1 (what `sys.exit(message)` does)."""
    raise SystemExit(message)
