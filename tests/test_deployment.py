"""The deployment files, checked by parsing (no Docker engine runs here)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from service.config import Settings
from tests.conftest import ROOT


def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return parsed


def test_compose_runs_migrations_before_the_api_against_a_shared_postgres() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "broker", "refresher"}
    assert services["refresher"]["command"] == ["broker", "refresher"]
    assert services["refresher"]["environment"] == services["broker"]["environment"]
    assert services["migrate"]["command"] == ["broker", "migrate"]
    assert services["broker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = services["broker"]["environment"]
    assert env["BROKER_ENV"] == "production"
    assert env["DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in env["DATABASE_URL"]


def test_compose_names_only_real_settings_and_holds_no_secret_value() -> None:
    env = compose()["services"]["broker"]["environment"]
    fields = {name.upper() for name in Settings.model_fields}
    assert set(env) <= fields
    for name in ("MP_CLIENT_SECRET", "BROKER_ENCRYPTION_KEYS", "MP_CLIENT_ID"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", env[name]), f"{name} must come from outside"


def test_the_image_runs_as_a_non_root_user_in_production_mode() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER broker$", dockerfile, re.M)
    assert "BROKER_ENV=production" in dockerfile
    assert 'CMD ["broker", "serve"]' in dockerfile
    for path in re.findall(r"^COPY (?:--from=\S+ )?(\S+)", dockerfile, re.M):
        if not path.startswith("/"):
            assert (ROOT / path).exists(), f"the Dockerfile copies a missing {path}"
