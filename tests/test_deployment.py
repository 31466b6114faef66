"""The deployment files, checked by parsing (no Docker engine runs here).

`docker compose up` with nothing set is the demo of `make run`; the same file runs production
once the environment overrides the demo's defaults. The helper `resolve` does what Compose does
to `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}` and `${VAR?message}`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError

from service.core.config import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, Settings
from service.core.crypto import generate_key_spec
from service.ops import demo
from tests.support import CLIENT_SECRET, ROOT

SERVICES = {"postgres", "migrate", "broker", "refresher", "simulator"}
LONG_RUNNING = SERVICES - {"migrate"}
BROKER_PROCESSES = ("migrate", "broker", "refresher")
SETTING_NAMES = {name.upper() for name in Settings.model_fields}
# What a production operator must be able to set without editing the file.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (inside a container: reachable from the others)
OVERRIDABLE = (
    "BROKER_ENV",
    "BROKER_PUBLIC_URL",
    "MP_CLIENT_ID",
    "MP_CLIENT_SECRET",
    "MP_REDIRECT_URI",
    "MP_AUTH_URL",
    "MP_TOKEN_URL",
    "MP_API_URL",
    "BROKER_ENCRYPTION_KEYS",
)
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
REAL = {  # what an operator sets for production (fake, but not placeholders)
    "BROKER_ENV": "production",
    "BROKER_PUBLIC_URL": "https://broker.example.com",
    "MP_CLIENT_ID": "8123456789012345",
    "MP_CLIENT_SECRET": "a-real-looking-client-secret-value",
    "MP_REDIRECT_URI": "https://broker.example.com/oauth/callback",
    "MP_AUTH_URL": "https://auth.mercadopago.com/authorization",
    "MP_TOKEN_URL": "https://api.mercadopago.com/oauth/token",
    "MP_API_URL": "https://api.mercadopago.com",
    "BROKER_ENCRYPTION_KEYS": generate_key_spec("k1"),
    "POSTGRES_PASSWORD": "a-real-looking-database-password",
}


def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return parsed


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def resolve(value: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation of one value against `env` (the shell and .env)."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        assert "$" not in arg, f"nested interpolation is not handled here: {match.group(0)}"
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if missing else str(current)
        if op in (":?", "?"):
            if missing:
                raise LookupError(f"{name}: {arg}")
            return str(current)
        return current or ""

    assert "$$" not in value, "escaped dollars are not handled here"
    return INTERPOLATION.sub(one, value)


def container_env(service: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a service's container gets: `KEY:` with no value passes `env` through."""
    env = env or {}
    resolved: dict[str, str] = {}
    for name, raw in services()[service].get("environment", {}).items():
        if raw is None:
            if name in env:
                resolved[name] = env[name]
        else:
            resolved[name] = resolve(str(raw), env)
    return resolved


def settings_of(
    service: str, monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings as the container builds them: from its environment only."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in container_env(service, env).items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def is_secretish(name: str) -> bool:
    return any(word in name for word in ("SECRET", "PASSWORD", "KEYS", "TOKEN")) and not (
        name.endswith("TOKEN_URL")
    )


def is_dev_placeholder(value: str) -> bool:
    return "dev" in value.lower() or "demo" in value.lower() or value == DEMO_CLIENT_SECRET


def fetch_target(healthcheck: dict[str, Any]) -> str:
    test = healthcheck["test"]
    command = test if isinstance(test, str) else " ".join(test)
    found = re.search(r"https?://[^'\" ]+", command)
    assert found, f"the healthcheck fetches no URL: {command}"
    return found.group(0)


# -- services and their order ------------------------------------------------------------------


def test_compose_runs_the_demo_services_and_migrates_before_anything_uses_the_database() -> None:
    found = services()
    assert set(found) == SERVICES
    assert found["migrate"]["command"] == ["broker", "migrate"]
    assert found["broker"]["command"] == ["broker", "serve"]
    assert found["refresher"]["command"] == ["broker", "refresher"]
    assert found["simulator"]["command"] == ["broker", "simulator"]
    assert found["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("broker", "refresher"):
        assert found[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert found["migrate"]["restart"] == "no"
    for name in ("broker", "refresher", "postgres"):
        assert found[name]["restart"] == "unless-stopped"


def test_every_long_running_service_has_a_healthcheck_on_its_own_port() -> None:
    found = services()
    for name in LONG_RUNNING:
        check = found[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name}'s healthcheck is disabled"
        assert check["test"], f"{name}'s healthcheck runs nothing"
    broker = urlsplit(fetch_target(found["broker"]["healthcheck"]))
    assert (broker.hostname, broker.port, broker.path) == ("127.0.0.1", 8000, "/healthz")
    assert "/readyz" in (ROOT / "docker-compose.yml").read_text()  # the balancer's hint
    refresher = urlsplit(fetch_target(found["refresher"]["healthcheck"]))
    port = int(container_env("refresher")["BROKER_REFRESHER_METRICS_PORT"])
    assert (refresher.hostname, refresher.port, refresher.path) == ("127.0.0.1", port, "/metrics")
    assert str(port) in found["refresher"]["expose"]
    simulator = urlsplit(fetch_target(found["simulator"]["healthcheck"]))
    assert simulator.port == int(container_env("simulator")["BROKER_SIMULATOR_PORT"])
    # The image's HEALTHCHECK probes the API port: the one-shot migration must not inherit it.
    assert found["migrate"]["healthcheck"] == {"disable": True}


def test_postgres_is_a_pinned_major_with_a_named_volume_and_pg_isready() -> None:
    document = compose()
    postgres = document["services"]["postgres"]
    assert re.fullmatch(r"postgres:1[3-9](\.\d+)?(-[a-z0-9.]+)?", postgres["image"]), (
        f"pin a PostgreSQL major version, not {postgres['image']}"
    )
    volume, _, target = postgres["volumes"][0].partition(":")
    assert target == "/var/lib/postgresql/data"
    assert volume in document["volumes"], "the data must live in a named volume"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "ports" not in postgres, "the database is reachable inside the compose network only"


def test_the_broker_processes_share_environment_and_the_data_volume() -> None:
    found = services()
    document = compose()
    env = found["broker"]["environment"]
    data_dir = env["BROKER_DATA_DIR"]
    for name in BROKER_PROCESSES:
        assert found[name]["environment"] == env, f"{name} sees other settings than the broker"
        assert f"broker-data:{data_dir}" in found[name]["volumes"], (
            f"{name} does not share the dev encryption key's volume"
        )
    assert "broker-data" in document["volumes"]
    assert env["BROKER_HOST"] == ALL_INTERFACES
    # A fresh named volume takes the owner of the image's directory: the non-root user's.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"mkdir -p {re.escape(data_dir)}\b", dockerfile)
    assert re.search(rf"chown broker(:broker)? {re.escape(data_dir)}\b", dockerfile)


# -- the demo: the broker and the simulator agree -------------------------------------------


def test_with_nothing_set_the_broker_talks_to_the_simulator_as_the_demo_application(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = services()
    broker = settings_of("broker", monkeypatch)
    assert not broker.production
    assert not broker.uses_simulator  # the compose values are used as they are
    assert broker.mp_client_id == DEMO_CLIENT_ID
    assert broker.apps["default"].oauth.client_secrets == (DEMO_CLIENT_SECRET,)
    assert broker.broker_encryption_keys is None  # the dev key file in the shared volume
    sim_port = int(container_env("simulator")["BROKER_SIMULATOR_PORT"])
    assert f"127.0.0.1:{sim_port}:{sim_port}" in found["simulator"]["ports"]
    assert f"{broker.broker_port}:{broker.broker_port}" in found["broker"]["ports"]
    # The broker container reaches the simulator by its service name ...
    for url in (broker.mp_token_url, broker.mp_api_url):
        assert (urlsplit(url).hostname, urlsplit(url).port) == ("simulator", sim_port)
    # ... and the browser reaches both on the published ports.
    assert urlsplit(broker.mp_auth_url)[:2] == ("http", f"localhost:{sim_port}")
    assert urlsplit(broker.broker_public_url)[:2] == ("http", f"localhost:{broker.broker_port}")
    assert broker.mp_redirect_uri == f"{broker.broker_public_url}/oauth/callback"


@pytest.mark.parametrize(
    "env",
    [{}, {name: REAL[name] for name in ("MP_CLIENT_ID", "MP_CLIENT_SECRET")}, REAL],
    ids=["defaults", "own-credentials", "production"],
)
def test_the_simulator_knows_the_brokers_application(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = settings_of("broker", monkeypatch, env)
    if env.get("BROKER_ENV") == "production":
        simulator_env = container_env("simulator", env)
        assert simulator_env["BROKER_ENV"] == "production"  # `broker simulator` refuses to run
        env = {**env, "BROKER_ENV": "dev"}
    simulator = settings_of("simulator", monkeypatch, env)
    assert simulator.broker_host == ALL_INTERFACES
    [client] = demo.simulator_config(simulator).clients  # what `broker simulator` serves
    assert client.client_id == broker.mp_client_id
    assert (client.client_secret,) == broker.apps["default"].oauth.client_secrets
    assert client.redirect_uris == (broker.mp_redirect_uri,)


def test_the_database_url_matches_the_postgres_service() -> None:
    for env in ({}, {"POSTGRES_PASSWORD": REAL["POSTGRES_PASSWORD"]}):
        postgres = container_env("postgres", env)
        url = urlsplit(container_env("broker", env)["DATABASE_URL"])
        assert url.scheme == "postgresql+asyncpg"
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert url.username == postgres["POSTGRES_USER"]
        assert url.password == postgres["POSTGRES_PASSWORD"]
        assert url.path == f"/{postgres['POSTGRES_DB']}"


# -- no secret in the file; production needs real values ------------------------------------


def test_compose_names_only_real_settings() -> None:
    for name, service in services().items():
        names = set(service.get("environment", {}))
        if name == "postgres":
            assert all(key.startswith("POSTGRES_") for key in names)
        else:
            assert names <= SETTING_NAMES, f"{name}: not settings: {names - SETTING_NAMES}"


@pytest.mark.parametrize("name", OVERRIDABLE)
def test_the_environment_overrides_every_demo_default(name: str) -> None:
    raw = services()["broker"]["environment"][name]
    if raw is None:
        return  # passed through from the environment as it is
    match = INTERPOLATION.fullmatch(raw)
    assert match, f"{name} is fixed in the file: {raw!r}"
    assert match.group(1) == name, f"{name} reads another variable: {raw!r}"
    assert container_env("broker", {name: "x"})[name] == "x"


def test_no_secret_is_hard_coded_beyond_obvious_dev_placeholders() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for found in INTERPOLATION.finditer(text):
        name, op, default = found.groups()
        if is_secretish(name) and op in (":-", "-") and default:
            assert is_dev_placeholder(default), f"{name} defaults to a real-looking {default!r}"
    for service_name, service in services().items():
        for name, raw in service.get("environment", {}).items():
            if not is_secretish(name) or raw is None:
                continue
            match = INTERPOLATION.fullmatch(str(raw))
            assert match, f"{service_name}: {name} is written into the file"
            assert match.group(1) == name, f"{service_name}: {name} reads another variable"
    # A password inside a URL comes from the environment too.
    for name in BROKER_PROCESSES:
        password = urlsplit(services()[name]["environment"]["DATABASE_URL"]).password
        assert password is not None
        assert INTERPOLATION.fullmatch(password), "DATABASE_URL holds a literal password"


def test_the_defaults_make_a_valid_dev_configuration_for_every_broker_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in BROKER_PROCESSES:
        settings = settings_of(name, monkeypatch)
        assert settings.broker_env == "dev"
        assert settings.database_url


def test_production_with_the_demo_defaults_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="production mode needs real values"):
        settings_of("broker", monkeypatch, {"BROKER_ENV": "production"})


def test_production_with_every_value_set_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of("broker", monkeypatch, REAL)
    assert settings.production
    assert settings.mp_token_url == REAL["MP_TOKEN_URL"]
    assert settings.broker_encryption_keys is not None


@pytest.mark.parametrize(
    "name",
    [
        "BROKER_PUBLIC_URL",
        "BROKER_ENCRYPTION_KEYS",
        "MP_CLIENT_ID",
        "MP_CLIENT_SECRET",
        "MP_REDIRECT_URI",
        "MP_AUTH_URL",
        "MP_TOKEN_URL",
        "MP_API_URL",
    ],
)
def test_production_refuses_each_demo_default_left_in_place(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator who forgets one variable must not run production on the demo's value."""
    env = {key: value for key, value in REAL.items() if key != name}
    with pytest.raises(ValidationError, match=name):
        settings_of("broker", monkeypatch, env)


def test_the_env_example_names_only_compose_variables_and_holds_no_secret() -> None:
    variables = set(INTERPOLATION.findall((ROOT / "docker-compose.yml").read_text()))
    interpolated = {name for name, _, _ in variables}
    passed_through = {
        name for name, raw in services()["broker"]["environment"].items() if raw is None
    }
    example = (ROOT / ".env.example").read_text()
    entries = dict(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=(.*)$", example, re.M))
    assert set(OVERRIDABLE) | {"POSTGRES_PASSWORD"} <= set(entries)
    assert set(entries) <= interpolated | passed_through
    for name, value in entries.items():
        if is_secretish(name):
            assert value == "", f".env.example gives {name} a value"
    assert not re.search(r"^[A-Z]", example, re.M), "every example line stays commented"


# -- the image -----------------------------------------------------------------------------------


def test_the_image_runs_as_a_non_root_user_in_production_mode() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER broker$", dockerfile, re.M)
    assert re.search(r"useradd\b.*--uid 10001\b", dockerfile)
    assert "BROKER_ENV=production" in dockerfile
    assert 'CMD ["broker", "serve"]' in dockerfile
    assert re.search(r"^FROM python:3\.\d+-slim\b", dockerfile, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", dockerfile, re.M)
    copied = re.findall(r"^COPY (?:--from=\S+ )?(\S+)", dockerfile, re.M)
    assert "service" in copied  # `broker simulator` lives in service/simulator
    for path in copied:
        if not path.startswith("/"):
            assert (ROOT / path).exists(), f"the Dockerfile copies a missing {path}"


# -- the committed OpenAPI document ----------------------------------------------------------

OPENAPI = ROOT / "openapi" / "openapi.json"
SECRET_SHAPES = {
    # Mercado Pago's shapes, as the simulator issues them: APP_USR-<app>-<stamp>-<32 hex>-<user>
    "access token": re.compile(r"(?:APP_USR|TEST)-\d+-\d+-[0-9a-f]{32}-\d+"),
    "refresh token": re.compile(r"TG-[0-9a-f]{16,}"),
    "API key": re.compile(r"mpb_[0-9a-f]{8}_[A-Za-z0-9_-]{43}"),
    "encryption key": re.compile(r"[A-Za-z0-9]+:[A-Za-z0-9_-]{43}"),
}
RANDOM_RUN = re.compile(r"[A-Za-z0-9_-]{20,}")
# An example value may hold a long run mixing cases or digits (`database_unavailable` does not)
# only when the run says it is made up.
MADE_UP = ("example", "fake", "00000000")


def _random_looking(run: str) -> bool:
    classes = sum(bool(re.search(c, run)) for c in ("[a-z]", "[A-Z]", "[0-9]"))
    return classes >= 2 and not any(marker in run.lower() for marker in MADE_UP)


KNOWN_SECRETS = {"test client secret": CLIENT_SECRET, "demo client secret": DEMO_CLIENT_SECRET}


def _strings(node: Any, in_example: bool = False) -> list[tuple[str, bool]]:
    """Every string of the document, marked when it is a value inside an example (keys are
    names, not example data)."""
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            found.append((str(key), False))
            found += _strings(value, in_example or key in ("example", "examples"))
        return found
    if isinstance(node, list):
        return [s for item in node for s in _strings(item, in_example)]
    return [(str(node), in_example)]


def secrets_in(document: Any) -> list[str]:
    """What in `document` looks like a secret: a known one, a token or key shape, or a long
    random-looking string in an example."""
    found = []
    for text, in_example in _strings(document):
        found += [name for name, secret in KNOWN_SECRETS.items() if secret in text]
        found += [name for name, shape in SECRET_SHAPES.items() if shape.search(text)]
        if in_example:
            found += [
                f"random-looking example {run[:6]}…"
                for run in RANDOM_RUN.findall(text)
                if _random_looking(run)
            ]
    return found


def test_the_committed_openapi_document_holds_no_secret_or_real_looking_token() -> None:
    assert secrets_in(json.loads(OPENAPI.read_text())) == []


def test_the_openapi_secret_scan_finds_each_kind_of_planted_secret() -> None:
    planted = {
        "access token": f"APP_USR-{DEMO_CLIENT_ID}-112233-{secrets.token_hex(16)}-241983636",
        "refresh token": f"TG-{secrets.token_hex(12)}-241983636",
        "API key": f"mpb_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}",
        "encryption key": generate_key_spec("k9"),
        "test client secret": f"secret: {CLIENT_SECRET}",
    }
    for name, value in planted.items():
        document = {"info": {"description": f"see {value}"}}
        assert name in secrets_in(document), name
    link = f"https://broker.example/link/{secrets.token_urlsafe(32)}"
    example = {"components": {"schemas": {"X": {"examples": [{"link_url": link}]}}}}
    assert secrets_in(example) == [f"random-looking example {link.rsplit('/', 1)[1][:6]}…"]
    made_up = {"examples": [{"link_url": "https://broker.example/link/q0ExAmPlEoNlYq0ExAmPlE"}]}
    assert secrets_in(made_up) == []
