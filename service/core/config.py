"""Settings, read once from the environment (and `.env`) by pydantic-settings.

Every setting is documented in the README's table; the names are the environment variables.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.core.applications import (
    DEFAULT,
    Application,
    Applications,
    ApplicationSpec,
    ConfigurationError,
    load_declared,
)

# Values people paste from examples; never acceptable in production.
PLACEHOLDERS = {"", "changeme", "change-me", "secret", "xxx", "todo", "placeholder", "example"}

LEASE_MARGIN_SECONDS = 5

# The demo application (`make run`, `docker compose up`): public on purpose, it only opens the
# built-in simulator, and production mode refuses it.
DEMO_CLIENT_ID = "1234567890123456"
DEMO_CLIENT_ID_BR = "2234567890123456"  # the demo's second application
DEMO_CLIENT_SECRET = "demo-secret-for-the-simulator-only"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

KEY_SPEC = re.compile(r"^[A-Za-z0-9_-]{1,16}:[A-Za-z0-9_-]{43}=?$")

DocsMode = Literal["public", "key", "off"]  # BROKER_DOCS


class Subscriber(BaseModel):
    """An internal service that receives the broker's events (README: "Events")."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    url: str = Field(pattern=r"^https?://")
    secret: SecretStr = Field(min_length=16)


def _hosts_as_query(url: str) -> str:
    """libpq's several hosts (`postgresql://user@a:5432,b:5432/db`, as Patroni and the cloud
    consoles write them) as SQLAlchemy reads them: `?host=a:5432&host=b:5432`, every port
    given (asyncpg tries the hosts in turn; `target_session_attrs=read-write` keeps the one
    that takes writes)."""
    scheme, rest = url.split("://", 1)
    netloc, slash, tail = rest.partition("/")
    user, at, hosts = netloc.rpartition("@")
    if "," not in hosts:
        return url
    path, _, query = tail.partition("?")
    named = [host if ":" in host else f"{host}:5432" for host in hosts.split(",")]
    params = "&".join([*(f"host={host}" for host in named), *([query] if query else [])])
    return f"{scheme}://{user}{at}{slash}{path}?{params}"


class Settings(BaseSettings):
    # hide_input_in_errors: a start-up error must never print the environment (it holds secrets).
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, hide_input_in_errors=True
    )

    broker_env: Literal["dev", "production"] = "dev"
    # Where secret settings may come from as files (read by `load_settings`, before the rest).
    broker_secrets_dir: Path | None = None
    database_url: str | None = None
    # Plain asyncpg connections for cold reads, claims and stores (service/core/db.py).
    broker_db_direct_connections: int = Field(default=10, ge=1, le=200)
    broker_data_dir: Path = Path(".broker")
    broker_public_url: str = "http://127.0.0.1:8000"
    broker_host: str = "127.0.0.1"
    broker_port: int = 8000
    # Slow and idle clients (service/ops/server.py): the time from a connection's start, or a
    # request's first byte, to its complete headers; connections + requests per process.
    broker_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    broker_max_connections: int = Field(default=2048, ge=16)
    # /docs and /openapi.json (service/ops/docs.py): open, behind an API key, or not served.
    broker_docs: DocsMode = "public"

    # Mercado Pago applications (service/core/applications.py): a declared list, and the MP_*
    # settings below as the application named `default`.
    broker_applications: SecretStr | None = None  # JSON; it holds secrets
    broker_applications_file: Path | None = None
    mp_client_id: str | None = None
    mp_client_secret: SecretStr | None = None
    mp_redirect_uri: str | None = None
    mp_auth_url: str = "https://auth.mercadopago.com/authorization"
    mp_token_url: str = "https://api.mercadopago.com/oauth/token"
    mp_pkce_method: Literal["S256", "plain", "off"] = "S256"
    mp_api_url: str = "https://api.mercadopago.com"
    mp_webhook_secret: SecretStr | None = None  # comma-separated while it is renewed
    broker_webhook_tolerance_seconds: int = Field(default=300, ge=10)
    mp_timeout_seconds: float = Field(default=10.0, gt=0, le=60)

    broker_encryption_keys: SecretStr | None = None
    # Envelope encryption (service/core/keys.py): data keys wrapped by OpenBao / Vault Transit.
    broker_key_service: Literal["local", "transit"] = "local"
    broker_transit_url: str | None = None
    broker_transit_mount: str = Field(default="transit", pattern=r"^[A-Za-z0-9_/-]{1,100}$")
    broker_transit_key: str = Field(default="broker", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    broker_transit_namespace: str | None = None
    broker_transit_ca_file: Path | None = None
    broker_vault_token: SecretStr | None = None
    broker_vault_role_id: str | None = None
    broker_vault_secret_id: SecretStr | None = None
    broker_vault_approle_mount: str = Field(default="approle", pattern=r"^[A-Za-z0-9_/-]{1,100}$")
    broker_key_check_seconds: float = Field(default=15.0, gt=0, le=3600)
    broker_key_service_wait_seconds: float = Field(default=30.0, ge=0, le=3600)
    broker_key_service_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Only for `broker keys import`: the BROKER_ENCRYPTION_KEYS being moved to the key service.
    broker_import_keys: SecretStr | None = None
    broker_link_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    broker_attempt_ttl_seconds: int = Field(default=600, ge=60, le=3600)
    broker_return_url_allowlist: Annotated[list[str], NoDecode] = []
    broker_allow_account_change: bool = False
    broker_simulator_port: int = 8001
    # Refresh policy (README: "Refresh policy").
    broker_refresh_fraction: float = Field(default=5 / 6, ge=0.5, le=0.95)
    broker_refresh_jitter_fraction: float = Field(default=0.02, ge=0, le=0.1)
    broker_refresh_floor_seconds: int = Field(default=300, ge=1)
    broker_refresh_concurrency: int = Field(default=8, ge=1, le=256)
    broker_refresh_rate_per_second: float = Field(default=10.0, gt=0)
    broker_refresh_batch_size: int = Field(default=50, ge=1, le=1000)
    broker_refresh_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    broker_serve_refresher: bool = False
    broker_lease_seconds: int = Field(default=60, ge=5)
    # After SIGTERM (and uvicorn's 10 s for requests in flight): the whole shutdown sequence
    # (service/ops/background.py). With compose's 30 s grace, 10 + 15 leaves room to exit.
    broker_shutdown_seconds: float = Field(default=15.0, ge=4, le=300)
    broker_min_ttl_max_seconds: int = Field(default=30 * 24 * 3600, ge=0)
    broker_on_read_cooldown_seconds: int = Field(default=30, ge=0)
    broker_backoff_base_seconds: int = Field(default=30, ge=1)
    broker_backoff_max_seconds: int = Field(default=3600, ge=1)
    broker_breaker_invalid_grant_threshold: int = Field(default=20, ge=1)
    broker_breaker_window_seconds: int = Field(default=60, ge=1)
    broker_breaker_probe_seconds: int = Field(default=300, ge=1)
    # Early refusals and rate limits (per replica: see service/serving/limits.py).
    broker_max_body_bytes: int = Field(default=16 * 1024, ge=1024)
    broker_max_query_bytes: int = Field(default=4096, ge=256)
    broker_max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    broker_trusted_proxies: Annotated[list[str], NoDecode] = []
    broker_rate_limit_per_address_per_minute: int = Field(default=60, ge=1)
    broker_rate_limit_per_key_per_second: int = Field(default=500, ge=1)
    # Failed API-key authentications per client address, before any lookup (enumeration).
    broker_failed_auth_per_address_per_minute: int = Field(default=30, ge=1)
    # Seller tokens and API keys kept in memory per API process (service/serving/cache.py); 0: none.
    broker_token_cache_size: int = Field(default=100_000, ge=0)
    # The Mercado Pago API proxy (service/proxy/): per replica, like the other limits.
    broker_proxy_timeout_seconds: float = Field(default=20.0, gt=0, le=120)
    broker_proxy_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    broker_proxy_max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    broker_proxy_rate_per_seller_per_second: float = Field(default=10.0, gt=0)
    broker_proxy_rate_per_application_per_second: float = Field(default=200.0, gt=0)
    broker_proxy_connections: int = Field(default=100, ge=1, le=10_000)
    # Audit trail and retention.
    broker_audit_flush_seconds: float = Field(default=5.0, gt=0, le=300)
    broker_audit_retention_days: int = Field(default=365, ge=1)
    broker_attempt_retention_days: int = Field(default=30, ge=1)
    # Events to internal services (service/lifecycle/events.py).
    broker_event_subscribers: list[Subscriber] = []
    broker_event_retry_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    broker_event_backoff_base_seconds: float = Field(default=5.0, gt=0)
    broker_event_backoff_max_seconds: float = Field(default=900.0, gt=0)
    broker_event_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    broker_event_concurrency: int = Field(default=8, ge=1, le=128)
    broker_expiring_soon_days: float = Field(default=7.0, gt=0)
    # Observability (service/ops/observe.py).
    broker_readiness_grace_seconds: float = Field(default=30.0, ge=0)
    broker_db_check_seconds: float = Field(default=2.0, gt=0, le=60)
    broker_metrics_db_seconds: float = Field(default=15.0, gt=0)
    broker_refresher_metrics_port: int = Field(default=9464, ge=0, le=65535)  # 0: none
    broker_log_format: Literal["auto", "json", "text"] = "auto"
    broker_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("broker_return_url_allowlist", "broker_trusted_proxies", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("broker_return_url_allowlist")
    @classmethod
    def _allowlist_entries_are_urls(cls, value: list[str]) -> list[str]:
        for entry in value:
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"allowlist entry is not an http(s) URL: {entry!r}")
        return value

    @field_validator("broker_trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)  # raises ValueError: a clear start-up error
        return value

    @field_validator("broker_encryption_keys", "broker_import_keys")
    @classmethod
    def _keys_are_well_formed(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            for spec in value.get_secret_value().split(","):
                if not KEY_SPEC.match(spec.strip()):
                    # Never echo the value: it is a key.
                    raise ValueError("each key must be key_id:<base64url of 32 bytes>")
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        if value and value.startswith(("postgresql://", "postgres://")):
            value = "postgresql+asyncpg://" + value.split("://", 1)[1]
        if value and not value.startswith("postgresql+asyncpg://"):
            raise ValueError("DATABASE_URL must be a postgresql+asyncpg:// URL")
        return value and _hosts_as_query(value)

    @field_validator("broker_event_subscribers")
    @classmethod
    def _subscriber_names_unique(cls, value: list[Subscriber]) -> list[Subscriber]:
        names = [subscriber.name for subscriber in value]
        if len(names) != len(set(names)):
            raise ValueError("BROKER_EVENT_SUBSCRIBERS names must be unique")
        return value

    @model_validator(mode="after")
    def _lease_outlives_the_request(self) -> Settings:
        # A worker never sends unless its lease outlives the whole request plus a margin.
        if self.broker_lease_seconds < self.mp_timeout_seconds + LEASE_MARGIN_SECONDS + 1:
            raise ValueError(
                "BROKER_LEASE_SECONDS must exceed MP_TIMEOUT_SECONDS by more than "
                f"{LEASE_MARGIN_SECONDS} s"
            )
        return self

    @model_validator(mode="after")
    def _one_source_of_keys(self) -> Settings:
        if self.broker_key_service != "transit":
            return self
        if self.broker_encryption_keys is not None:
            # Two sources would leave doubt about which key sealed what: the move from one to
            # the other is `broker keys import` (README: key management).
            raise ValueError("set BROKER_ENCRYPTION_KEYS or BROKER_KEY_SERVICE=transit, not both")
        parts = urlsplit(self.broker_transit_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("BROKER_KEY_SERVICE=transit needs BROKER_TRANSIT_URL (http(s)://…)")
        approle = bool(self.broker_vault_role_id) and self.broker_vault_secret_id is not None
        if (self.broker_vault_token is not None) == approle:
            raise ValueError(
                "BROKER_KEY_SERVICE=transit needs BROKER_VAULT_TOKEN, or BROKER_VAULT_ROLE_ID "
                "and BROKER_VAULT_SECRET_ID (AppRole): exactly one of them"
            )
        return self

    @model_validator(mode="after")
    def _applications_are_well_formed(self) -> Settings:
        # At start-up, with the field and the application named (and no value echoed).
        if self.has_applications:
            _ = self.apps
        return self

    @model_validator(mode="after")
    def _production_needs_everything(self) -> Settings:
        if self.broker_env != "production":
            return self
        missing = []
        if not self.database_url:
            # Replicas with private embedded databases would each refresh (burn) the same tokens.
            missing.append("DATABASE_URL")
        if self.broker_key_service == "transit":
            if urlsplit(self.broker_transit_url or "").hostname not in LOOPBACK_HOSTS and not (
                self.broker_transit_url or ""
            ).startswith("https://"):
                missing.append("BROKER_TRANSIT_URL (https)")
        elif _placeholder(self.broker_encryption_keys):
            missing.append("BROKER_ENCRYPTION_KEYS (or BROKER_KEY_SERVICE=transit)")
        if not self.broker_public_url.startswith("https://"):
            missing.append("BROKER_PUBLIC_URL (https)")
        if self._has_default:
            missing += _unfit(self._default_fields(), DEFAULT_APPLICATION_SETTINGS.__getitem__)
        for spec in self.declared:
            fields = {name: getattr(spec, name) for name in DEFAULT_APPLICATION_SETTINGS}
            fields["auth_url"] = spec.authorization_endpoint
            missing += _unfit(fields, partial(_field_of, spec.name))
        if missing:
            raise ValueError("production mode needs real values for: " + ", ".join(missing))
        return self

    def _default_fields(self) -> dict[str, Any]:
        return {
            field: getattr(self, name.lower())
            for field, name in DEFAULT_APPLICATION_SETTINGS.items()
        }

    @property
    def has_applications(self) -> bool:
        """Whether any application is configured (dev mode without one runs the demo)."""
        return bool(self.broker_applications or self.broker_applications_file or self.mp_client_id)

    @cached_property
    def declared(self) -> list[ApplicationSpec]:
        """The applications of BROKER_APPLICATIONS or its file, read and validated once."""
        return load_declared(self.broker_applications, self.broker_applications_file)

    @property
    def _has_default(self) -> bool:
        """Whether MP_* describe an application: when set, or when nothing else is declared
        (production then says which MP_* are missing)."""
        return bool(self.mp_client_id) or not self.declared

    @cached_property
    def apps(self) -> Applications:
        """The configured applications: the declared list, and `default` from MP_*."""
        specs = list(self.declared)
        if self._has_default:
            fields = self._default_fields()
            missing = [
                DEFAULT_APPLICATION_SETTINGS[field]
                for field in ("client_id", "client_secret", "redirect_uri")
                if not fields[field]
            ]
            if missing:
                raise ConfigurationError(f"application 'default': set {', '.join(missing)}")
            specs.insert(0, _default_spec(fields))
        rate = self.broker_refresh_rate_per_second
        return Applications([Application.of(spec, rate) for spec in specs])

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> Settings:
        copy = super().model_copy(update=update, deep=deep)
        for computed in ("declared", "apps"):  # from the fields, which may have changed
            copy.__dict__.pop(computed, None)
        return copy

    @property
    def production(self) -> bool:
        return self.broker_env == "production"

    @property
    def uses_simulator(self) -> bool:
        """Dev mode without Mercado Pago credentials: the demo talks to the built-in simulator."""
        return not self.production and not self.has_applications

    @property
    def secure_cookies(self) -> bool:
        return self.broker_public_url.startswith("https://")


# The MP_* settings of the `default` application, by the application field they fill.
DEFAULT_APPLICATION_SETTINGS = {
    "client_id": "MP_CLIENT_ID",
    "client_secret": "MP_CLIENT_SECRET",
    "redirect_uri": "MP_REDIRECT_URI",
    "auth_url": "MP_AUTH_URL",
    "token_url": "MP_TOKEN_URL",
    "api_url": "MP_API_URL",
    "pkce": "MP_PKCE_METHOD",
    "webhook_secret": "MP_WEBHOOK_SECRET",
}


def _default_spec(fields: dict[str, Any]) -> ApplicationSpec:
    try:
        return ApplicationSpec(name=DEFAULT, **fields)
    except ValidationError as exc:
        # Named by the setting an operator sets, never by value.
        where = ", ".join(
            f"{DEFAULT_APPLICATION_SETTINGS.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigurationError(f"application 'default': {where}") from None


def _field_of(application: str, field: str) -> str:
    return f"application {application!r} {field}"


def _placeholder(secret: SecretStr | list[SecretStr] | None) -> bool:
    if isinstance(secret, list):
        values = [s.get_secret_value() for s in secret] or [""]
    else:
        values = secret.get_secret_value().split(",") if secret else [""]
    refused = PLACEHOLDERS | {DEMO_CLIENT_SECRET.lower()}
    return any(value.strip().lower() in refused for value in values)


def _unfit(fields: dict[str, Any], label: Callable[[str], str]) -> list[str]:
    """What production refuses in one application's fields, labelled by `label(field)`."""
    unfit = []
    if (fields["client_id"] or "").strip().lower() in PLACEHOLDERS | {
        DEMO_CLIENT_ID,
        DEMO_CLIENT_ID_BR,
    }:
        unfit.append(label("client_id"))
    if _placeholder(fields["client_secret"]):
        unfit.append(label("client_secret"))
    if fields["webhook_secret"] and _placeholder(fields["webhook_secret"]):
        unfit.append(label("webhook_secret"))
    # Codes, secrets and tokens travel on these: never in clear (nor to a simulator).
    for field in ("redirect_uri", "auth_url"):
        if not (fields[field] or "").startswith("https://"):
            unfit.append(f"{label(field)} (https)")
    # Server-side calls may use plain http to loopback (an egress proxy beside us).
    for field in ("token_url", "api_url"):
        url = urlsplit(fields[field])
        if url.scheme != "https" and not (url.scheme == "http" and url.hostname in LOOPBACK_HOSTS):
            unfit.append(f"{label(field)} (https)")
    return unfit


def load_settings() -> Settings:
    """The settings from the environment, `.env`, and with BROKER_SECRETS_DIR set, one file
    per setting in that directory (Docker and Kubernetes secrets: `/run/secrets/<name>`, the
    setting's name in lower case). The environment wins over a file."""
    secrets_dir = os.environ.get("BROKER_SECRETS_DIR")
    if secrets_dir:
        if not Path(secrets_dir).is_dir():
            raise ValueError(f"BROKER_SECRETS_DIR is not a directory: {secrets_dir}")
        return Settings(_secrets_dir=secrets_dir)
    return Settings()


@lru_cache
def get_settings() -> Settings:
    return load_settings()
