"""Demo mode: `make run` without Mercado Pago credentials talks to the built-in simulator.

The demo application's id and secret are public on purpose: they only open the simulator, and
production mode refuses to start without real credentials.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.config import DEMO_CLIENT_ID, DEMO_CLIENT_ID_BR, DEMO_CLIENT_SECRET, Settings
from service.core.db import transaction
from service.core.domain import KeyView
from service.core.errors import Unauthorized
from service.core.runtime import utcnow
from service.serving import apikeys
from service.simulator import SimulatorClient, SimulatorConfig


def simulator_url(settings: Settings) -> str:
    return f"http://{settings.broker_host}:{settings.broker_simulator_port}"


def with_simulator(settings: Settings) -> Settings:
    """The settings pointed at the simulator (a copy; production never gets here): two demo
    applications, as a platform selling in two countries has. `ar` requires PKCE and comes back
    on the shared callback URL; `br` has PKCE off and its own callback URL."""
    if not settings.uses_simulator:
        raise ValueError("the simulator stands in only in dev mode without MP credentials")
    sim = simulator_url(settings)
    callback = f"{settings.broker_public_url.rstrip('/')}/oauth/callback"
    urls = {"auth_url": f"{sim}/authorization", "token_url": f"{sim}/oauth/token", "api_url": sim}
    apps = [
        {
            "name": "ar",
            "country": "ar",
            "client_id": DEMO_CLIENT_ID,
            "client_secret": DEMO_CLIENT_SECRET,
            "redirect_uri": callback,
            "pkce": "S256",
            **urls,  # /users/me checks go to the simulator too
        },
        {
            "name": "br",
            "country": "br",
            "client_id": DEMO_CLIENT_ID_BR,
            "client_secret": DEMO_CLIENT_SECRET,
            "redirect_uri": f"{callback}/br",
            "pkce": "off",
            **urls,
        },
    ]
    return settings.model_copy(update={"broker_applications": SecretStr(json.dumps(apps))})


def simulator_config(settings: Settings) -> SimulatorConfig:
    """What the simulator serves: every application of `settings`, as Mercado Pago would."""
    return SimulatorConfig(
        clients=[
            SimulatorClient(
                client_id=app.client_id,
                client_secret=app.oauth.client_secrets[0],
                redirect_uris=(app.oauth.redirect_uri,),
                pkce_required=app.pkce != "off",
                name=f"Demo store ({app.name})",
            )
            for app in settings.apps.values()
        ]
    )


async def dev_api_key(sessions: async_sessionmaker[AsyncSession], data_dir: Path) -> str:
    """The dev API key of this local database, created on first run and kept in the data dir."""
    path = data_dir / "dev-api-key"
    if path.exists():
        secret = path.read_text().strip()
        async with sessions() as session:
            try:
                key: KeyView | None = await apikeys.authenticate(session, f"Bearer {secret}")
            except Unauthorized:  # unknown here (a fresh database): make a new one
                key = None
        if key is not None:
            return secret
    async with transaction(sessions) as session:
        now = utcnow()
        _, secret = await apikeys.create(session, f"dev-{now:%Y%m%d%H%M%S}", now)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


def banner(settings: Settings, api_key: str, *, simulated: bool) -> str:
    base = settings.broker_public_url.rstrip("/")
    apps = settings.apps
    names = ", ".join(f"{app.name} (client_id {app.client_id})" for app in apps.values())
    mode = (
        f"demo: Mercado Pago is the built-in simulator at {simulator_url(settings)}"
        if simulated
        else "talking to Mercado Pago"
    )
    # With several applications a link names one: a demo seller for each application.
    links = "\n".join(
        f"   curl -s -X POST {base}/link/start -H 'Authorization: Bearer {api_key}' \\\n"
        f"        -H 'Content-Type: application/json' -d "
        f'\'{{"seller_id": "demo-seller-{n}", "application": "{name}"}}\''
        for n, name in enumerate(apps, start=1)
    )
    return f"""
Mercado Pago token broker ({mode})
  Applications {names}
  API docs     {base}/docs
  Dev API key  {api_key}   (kept in {settings.broker_data_dir}/dev-api-key; dev only)

1. Ask for a link for a seller, through each application:
{links}
2. Open a returned link_url in a browser and click Allow.
3. Fetch the seller's access token:
   curl -s {base}/sellers/demo-seller-1/token -H 'Authorization: Bearer {api_key}'
4. Watch it work:
   curl -s {base}/metrics | grep -E '^broker_(link_attempts|token_exchanges|sellers)'
   curl -s {base}/sellers/demo-seller-1 -H 'Authorization: Bearer {api_key}'
"""
