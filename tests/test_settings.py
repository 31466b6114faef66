"""Settings: production refuses to start without real values; dev mode fills in safe defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from service.core.config import Settings, load_settings
from service.core.crypto import generate_key_spec
from service.core.keys import local_keyring
from service.ops.cli import main

KEYS = generate_key_spec("k1")
PRODUCTION: dict[str, object] = {
    "broker_env": "production",
    "database_url": "postgresql+asyncpg://broker@db.internal/broker",
    "broker_public_url": "https://broker.example",
    "mp_client_id": "1234567890",
    "mp_client_secret": SecretStr("a-real-client-secret-value"),
    "mp_redirect_uri": "https://broker.example/oauth/callback",
    "broker_encryption_keys": SecretStr(KEYS),
}


def make(**overrides: object) -> Settings:
    return Settings(_env_file=None, **{**PRODUCTION, **overrides})  # type: ignore[arg-type]


def test_a_complete_production_configuration_is_accepted() -> None:
    assert make().production


def test_production_may_call_mercado_pago_through_a_loopback_egress_proxy() -> None:
    settings = make(
        mp_token_url="http://127.0.0.1:3128/oauth/token", mp_api_url="http://[::1]:3128"
    )
    assert settings.production


def test_production_without_database_url_is_fatal_never_an_embedded_database() -> None:
    with pytest.raises(ValidationError, match="DATABASE_URL"):
        make(database_url=None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mp_client_secret", SecretStr("changeme")),
        ("mp_client_secret", SecretStr("a-real-client-secret-value,changeme")),
        ("mp_client_secret", None),
        ("mp_client_id", ""),
        ("mp_redirect_uri", None),
        ("broker_encryption_keys", None),
        ("broker_public_url", "http://broker.example"),
        ("mp_client_id", "1234567890123456"),  # the demo's
        ("mp_client_secret", SecretStr("demo-secret-for-the-simulator-only")),
        ("mp_auth_url", "http://auth.mercadopago.example/authorization"),
        ("mp_redirect_uri", "http://127.0.0.1:8000/oauth/callback"),  # a browser goes there
        ("mp_token_url", "http://simulator:8001/oauth/token"),
        ("mp_api_url", "http://api.mercadopago.example"),
    ],
)
def test_production_refuses_missing_or_placeholder_secrets(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field.upper()):
        make(**{field: value})


def test_a_malformed_encryption_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as info:
        make(broker_encryption_keys=SecretStr("k1:tooshort-secret-material"))
    assert "tooshort-secret-material" not in str(info.value)


def test_secrets_never_print() -> None:
    shown = repr(make()) + str(make())
    assert "a-real-client-secret-value" not in shown
    assert KEYS.split(":")[1] not in shown


def test_a_plain_postgresql_url_gets_the_asyncpg_driver() -> None:
    url = make(database_url="postgresql://u@h/db").database_url
    assert url == "postgresql+asyncpg://u@h/db"


def test_defaults_point_at_mercado_pago_and_keep_dev_data_local(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.lower() in Settings.model_fields:
            monkeypatch.delenv(name)
    settings = Settings(_env_file=None)
    assert settings.mp_auth_url == "https://auth.mercadopago.com/authorization"
    assert settings.mp_token_url == "https://api.mercadopago.com/oauth/token"
    assert settings.broker_link_ttl_seconds == 7 * 24 * 3600
    assert settings.broker_env == "dev"
    assert settings.broker_data_dir == Path("./.broker")
    assert settings.mp_pkce_method == "S256"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_RETURN_URL_ALLOWLIST", "https://a.example/x/, https://b.example/")
    monkeypatch.setenv("MP_PKCE_METHOD", "plain")
    monkeypatch.setenv("BROKER_LINK_TTL_SECONDS", "3600")
    settings = Settings(_env_file=None)
    assert settings.broker_return_url_allowlist == ["https://a.example/x/", "https://b.example/"]
    assert settings.mp_pkce_method == "plain"
    assert settings.broker_link_ttl_seconds == 3600


def test_dev_mode_generates_a_local_key_once_and_keeps_it(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, broker_data_dir=tmp_path)
    first = local_keyring(settings)
    second = local_keyring(settings)
    assert first.primary == second.primary == "dev1"
    sealed = first.seal("x", "ctx")
    assert second.open(sealed, "ctx") == "x"
    assert (tmp_path / "dev-encryption-key").stat().st_mode & 0o077 == 0


def test_the_cli_refuses_bad_production_settings_naming_them_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BROKER_ENV", "production")
    monkeypatch.setenv("MP_CLIENT_SECRET", "changeme")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    from service.core.config import get_settings

    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["migrate"])
    finally:
        get_settings.cache_clear()
    message = str(exit_info.value.code)
    assert "DATABASE_URL" in message
    assert "MP_CLIENT_SECRET" in message


def test_the_client_secret_is_an_ordered_list() -> None:
    settings = make(mp_client_secret=SecretStr("new-secret-value, old-secret-value"))
    assert settings.apps["default"].oauth.client_secrets == ("new-secret-value", "old-secret-value")


def test_secret_settings_may_come_from_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docker and Kubernetes mount secrets as files (`/run/secrets/<name>`): production needs
    none of them in its environment."""
    apps = '[{"name": "br", "client_id": "7200000000000002", "client_secret": "br-from-a-file",'
    apps += ' "redirect_uri": "https://broker.example/oauth/callback/br", "country": "br"}]'
    files = {
        "mp_client_secret": "a-real-client-secret-from-a-file\n",  # a trailing newline, as echo
        "mp_webhook_secret": "webhook-secret-from-a-file",
        "broker_encryption_keys": KEYS,
        "database_url": "postgresql://broker:password-from-a-file@db.internal/broker",
        "broker_applications": apps,
    }
    for name, value in files.items():
        (tmp_path / name).write_text(value)
    for name in [*files, "mp_client_id", "broker_env", "broker_public_url", "mp_redirect_uri"]:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("BROKER_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("BROKER_ENV", "production")
    monkeypatch.setenv("BROKER_PUBLIC_URL", "https://broker.example")
    monkeypatch.setenv("MP_CLIENT_ID", "1234567890")
    monkeypatch.setenv("MP_REDIRECT_URI", "https://broker.example/oauth/callback")
    settings = load_settings()
    assert settings.production
    assert settings.apps["default"].oauth.client_secrets == ("a-real-client-secret-from-a-file",)
    assert settings.apps["default"].webhook_secrets == ("webhook-secret-from-a-file",)
    assert settings.apps["br"].oauth.client_secrets == ("br-from-a-file",)
    assert settings.database_url is not None
    assert "password-from-a-file" in settings.database_url
    assert local_keyring(settings).primary == "k1"
    # The environment wins over a file (an override during an incident).
    monkeypatch.setenv("MP_WEBHOOK_SECRET", "from-the-environment")
    assert load_settings().apps["default"].webhook_secrets == ("from-the-environment",)


def test_a_missing_secrets_directory_stops_the_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_SECRETS_DIR", "/nonexistent/secrets")
    with pytest.raises(ValueError, match="BROKER_SECRETS_DIR"):
        load_settings()


@pytest.mark.parametrize(
    "files",
    [
        {"broker_vault_token": "s.token-from-a-file\n"},
        {"broker_vault_role_id": "role-from-a-file", "broker_vault_secret_id": "secret-id-file"},
    ],
)
def test_the_vault_token_or_approle_comes_from_files(
    files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Transit, no key material and no Vault credential need sit in the environment."""
    for name, value in files.items():
        (tmp_path / name).write_text(value)
    for name in ("BROKER_ENCRYPTION_KEYS", *(name.upper() for name in files)):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("BROKER_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("BROKER_KEY_SERVICE", "transit")
    monkeypatch.setenv("BROKER_TRANSIT_URL", "https://bao.internal:8200")
    settings = load_settings()
    token, secret_id = settings.broker_vault_token, settings.broker_vault_secret_id
    if "broker_vault_token" in files:
        assert token is not None
        assert token.get_secret_value() == "s.token-from-a-file"
    else:
        assert settings.broker_vault_role_id == "role-from-a-file"
        assert secret_id is not None
        assert secret_id.get_secret_value() == "secret-id-file"


@pytest.mark.parametrize(
    ("given", "read", "hosts"),
    [
        # libpq's several hosts, as Patroni and the cloud consoles write them; a missing port
        # is PostgreSQL's (asyncpg needs every one).
        (
            "postgresql://broker:pw@db-a:5432,db-b/broker?target_session_attrs=read-write",
            "postgresql+asyncpg://broker:pw@/broker"
            "?host=db-a:5432&host=db-b:5432&target_session_attrs=read-write",
            (["db-a", "db-b"], [5432, 5432]),
        ),
        # SQLAlchemy's own form, and one host, as they were.
        (
            "postgresql+asyncpg://broker@/broker?host=db-a:5432&host=db-b:5433",
            "postgresql+asyncpg://broker@/broker?host=db-a:5432&host=db-b:5433",
            (["db-a", "db-b"], [5432, 5433]),
        ),
        (
            "postgres://broker@db:6432/broker",
            "postgresql+asyncpg://broker@db:6432/broker",
            ("db", 6432),
        ),
    ],
)
def test_a_database_url_may_name_several_hosts(
    given: str, read: str, hosts: tuple[object, object]
) -> None:
    from service.core import db

    url = make(database_url=given).database_url
    assert url == read
    # The direct pool, the cache's listener and the owner lock see the same servers.
    params = db.asyncpg_params(url, "tests")
    assert (params["host"], params["port"]) == hosts
