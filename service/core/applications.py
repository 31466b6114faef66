"""The Mercado Pago applications the broker serves: usually one per country.

A Mercado Pago application belongs to one country's account and has its own credentials,
Redirect URL, PKCE switch and rate limits, so a platform selling in Argentina and Brazil runs
two. They are declared in one place (README: "Applications"):

- `BROKER_APPLICATIONS_FILE`: a `.json` or `.toml` file holding the list, or
- `BROKER_APPLICATIONS`: the same list as JSON in the environment;
- and the `MP_*` settings, as they always were: one more application named `default`.

A seller belongs to the application that linked it. Rows carry its `client_id`, which every
sealed value's associated data binds; the name is configuration only. So an application may be
renamed, and moving from `MP_*` to a declared list changes no row: declare the same `client_id`
under any name.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from service.core.mercadopago import OAuthApp

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
DEFAULT = "default"  # the application the MP_* settings describe

# The authorization host of each country (the facts sheet); `global` serves every country
# according to the SDKs that use it, which is uncertain: hence the explicit `auth_url`.
AUTH_HOSTS = {
    "ar": "auth.mercadopago.com.ar",
    "br": "auth.mercadopago.com.br",
    "mx": "auth.mercadopago.com.mx",
    "co": "auth.mercadopago.com.co",
    "uy": "auth.mercadopago.com.uy",
    "pe": "auth.mercadopago.com.pe",
    "cl": "auth.mercadopago.cl",  # not .com.cl
    "global": "auth.mercadopago.com",
}
Country = Literal["ar", "br", "mx", "co", "uy", "pe", "cl", "global"]
API_URL = "https://api.mercadopago.com"
TOKEN_URL = f"{API_URL}/oauth/token"
Pkce = Literal["S256", "plain", "off"]


def _secret_list(value: object) -> object:
    """A secret is a list while it is renewed: a JSON/TOML list, or one comma-separated string."""
    if value is None:
        return []
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


Secrets = Annotated[list[SecretStr], BeforeValidator(_secret_list)]


def _is_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL")
    return value


class ApplicationSpec(BaseModel):
    """One application as declared (validated at start-up)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field(pattern=NAME_PATTERN)
    client_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    client_secret: Secrets = Field(min_length=1)
    redirect_uri: str
    country: Country = "global"
    auth_url: str | None = None  # default: https://<the country's host>/authorization
    token_url: str = TOKEN_URL
    api_url: str = API_URL  # `GET /users/me`
    pkce: Pkce = "S256"  # as switched on in the application's details screen
    webhook_secret: Secrets = []
    # Mercado Pago limits requests per application; default BROKER_REFRESH_RATE_PER_SECOND.
    refresh_rate_per_second: float | None = Field(default=None, gt=0)

    @property
    def authorization_endpoint(self) -> str:
        return self.auth_url or f"https://{AUTH_HOSTS[self.country]}/authorization"

    @field_validator("country", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("redirect_uri", "auth_url", "token_url", "api_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return None if value is None else _is_url(value)

    @model_validator(mode="after")
    def _served_callback(self) -> ApplicationSpec:
        # Mercado Pago sends the seller back to exactly this URL: one the broker does not serve
        # would be found out only at the first seller's callback (a 404). A prefix before it
        # is a proxy's business.
        path = urlsplit(self.redirect_uri).path.rstrip("/")
        if not path.endswith(("/oauth/callback", f"/oauth/callback/{self.name}")):
            raise ValueError(
                f"redirect_uri must end in /oauth/callback or /oauth/callback/{self.name}"
            )
        return self


@dataclass(frozen=True, repr=False)
class Application:
    """One application as the flows use it."""

    name: str
    oauth: OAuthApp  # what the token endpoint needs (mercadopago.py)
    api_url: str
    pkce: Pkce
    webhook_secrets: tuple[str, ...]
    refresh_rate: float

    def __repr__(self) -> str:
        return f"Application({self.name!r}, client_id={self.client_id!r})"

    @property
    def client_id(self) -> str:
        return self.oauth.client_id

    @property
    def challenge_method(self) -> Literal["S256", "plain"] | None:
        return None if self.pkce == "off" else self.pkce

    @classmethod
    def of(cls, spec: ApplicationSpec, default_rate: float) -> Application:
        return cls(
            name=spec.name,
            oauth=OAuthApp(
                client_id=spec.client_id,
                client_secrets=tuple(s.get_secret_value() for s in spec.client_secret),
                redirect_uri=spec.redirect_uri,
                auth_url=spec.authorization_endpoint,
                token_url=spec.token_url,
                name=spec.name,
            ),
            api_url=spec.api_url,
            pkce=spec.pkce,
            webhook_secrets=tuple(s.get_secret_value() for s in spec.webhook_secret),
            refresh_rate=spec.refresh_rate_per_second or default_rate,
        )


class ConfigurationError(ValueError):
    """An application is declared wrongly. The message names the application and the field,
    never a value (the declarations hold secrets)."""


class Applications(Mapping[str, Application]):
    """The configured applications by name, and by client_id (how rows name them)."""

    def __init__(self, apps: list[Application]) -> None:
        if not apps:
            raise ConfigurationError(
                "no Mercado Pago application: set MP_CLIENT_ID, MP_CLIENT_SECRET and "
                "MP_REDIRECT_URI, or BROKER_APPLICATIONS / BROKER_APPLICATIONS_FILE"
            )
        self.by_name: dict[str, Application] = {}
        self.by_client_id: dict[str, Application] = {}
        for app in apps:
            if app.name in self.by_name:
                raise ConfigurationError(f"application {app.name!r}: name is declared twice")
            twin = self.by_client_id.get(app.client_id)
            if twin is not None:
                raise ConfigurationError(
                    f"applications {twin.name!r} and {app.name!r} have the same client_id"
                )
            self.by_name[app.name] = app
            self.by_client_id[app.client_id] = app

    def __getitem__(self, name: str) -> Application:
        return self.by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)

    def __repr__(self) -> str:
        return f"Applications({list(self.by_name)})"

    @property
    def client_ids(self) -> list[str]:
        return list(self.by_client_id)

    def name_of(self, client_id: str) -> str:
        """The name rows of `client_id` go by (a client_id no longer configured shows as itself,
        so its sellers stay visible in metrics and listings)."""
        app = self.by_client_id.get(client_id)
        return app.name if app is not None else f"unconfigured:{client_id}"

    def chosen(self, name: str | None) -> Application | None:
        """The application a request names; with only one configured, naming none picks it.
        None when the name is unknown, or missing while several are configured."""
        if name is None:
            return next(iter(self.by_name.values())) if len(self) == 1 else None
        return self.by_name.get(name)


_SPECS = TypeAdapter(list[ApplicationSpec], config=ConfigDict(hide_input_in_errors=True))


def parse_specs(raw: Any, source: str) -> list[ApplicationSpec]:
    """Validate declared applications; errors say where, never what (no value is echoed)."""
    if isinstance(raw, Mapping) and set(raw) == {"applications"}:
        raw = raw["applications"]  # a TOML file's [[applications]] tables
    try:
        return _SPECS.validate_python(raw)
    except ValidationError as exc:
        where = "; ".join(_where(raw, error) for error in exc.errors())
        raise ConfigurationError(f"{source}: {where}") from None


def _where(raw: Any, error: Any) -> str:
    loc = list(error["loc"])
    where = "the list"
    if loc and isinstance(loc[0], int):
        index = loc.pop(0)
        entry = raw[index] if isinstance(raw, list) and index < len(raw) else None
        name = entry.get("name") if isinstance(entry, Mapping) else None
        where = f"application {name!r}" if isinstance(name, str) else f"application #{index + 1}"
    field = ".".join(str(part) for part in loc if not isinstance(part, int)) or "entry"
    return f"{where}: {field}: {error['msg']}"


def load_declared(inline: SecretStr | None, file: Path | None) -> list[ApplicationSpec]:
    """The applications of BROKER_APPLICATIONS or BROKER_APPLICATIONS_FILE (not both)."""
    if inline is not None and file is not None:
        raise ConfigurationError("set BROKER_APPLICATIONS or BROKER_APPLICATIONS_FILE, not both")
    if file is not None:
        source = f"BROKER_APPLICATIONS_FILE ({file})"
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigurationError(f"{source}: cannot be read ({exc.strerror})") from None
        try:
            raw = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError):
            # No parser message: it would quote the line, and the line may hold a secret.
            raise ConfigurationError(f"{source}: not valid {file.suffix[1:] or 'JSON'}") from None
        return parse_specs(raw, source)
    if inline is not None:
        try:
            raw = json.loads(inline.get_secret_value())
        except ValueError:
            raise ConfigurationError("BROKER_APPLICATIONS: not valid JSON") from None
        return parse_specs(raw, "BROKER_APPLICATIONS")
    return []
