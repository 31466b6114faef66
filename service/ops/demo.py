"""Demo mode: `make run` without Mercado Pago credentials talks to the built-in simulator.

The demo application's id and secret are public on purpose: they only open the simulator, and
production mode refuses to start without real credentials.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.config import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, Settings
from service.core.db import transaction
from service.core.domain import KeyView
from service.core.errors import Unauthorized
from service.core.runtime import utcnow
from service.serving import apikeys
from service.simulator import SimulatorClient, SimulatorConfig


def simulator_url(settings: Settings) -> str:
    return f"http://{settings.broker_host}:{settings.broker_simulator_port}"


def with_simulator(settings: Settings) -> Settings:
    """The settings pointed at the simulator (a copy; production never gets here)."""
    if not settings.uses_simulator:
        raise ValueError("the simulator stands in only in dev mode without MP credentials")
    sim = simulator_url(settings)
    return settings.model_copy(
        update={
            "mp_client_id": DEMO_CLIENT_ID,
            "mp_client_secret": SecretStr(DEMO_CLIENT_SECRET),
            "mp_redirect_uri": f"{settings.broker_public_url.rstrip('/')}/oauth/callback",
            "mp_auth_url": f"{sim}/authorization",
            "mp_token_url": f"{sim}/oauth/token",
            "mp_api_url": sim,  # /users/me checks go to the simulator too
        }
    )


def simulator_config(settings: Settings) -> SimulatorConfig:
    if not (settings.mp_client_id and settings.mp_client_secret and settings.mp_redirect_uri):
        raise ValueError("the simulator needs MP_CLIENT_ID, MP_CLIENT_SECRET, MP_REDIRECT_URI")
    return SimulatorConfig(
        clients=[
            SimulatorClient(
                client_id=settings.mp_client_id,
                client_secret=settings.mp_client_secrets[0],
                redirect_uris=(settings.mp_redirect_uri,),
            )
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
    mode = (
        f"demo: Mercado Pago is the built-in simulator at {simulator_url(settings)}"
        if simulated
        else f"talking to Mercado Pago as application {settings.mp_client_id}"
    )
    return f"""
Mercado Pago token broker ({mode})
  API docs     {base}/docs
  Dev API key  {api_key}   (kept in {settings.broker_data_dir}/dev-api-key; dev only)

1. Ask for a link for a seller:
   curl -s -X POST {base}/link/start -H 'Authorization: Bearer {api_key}' \\
        -H 'Content-Type: application/json' -d '{{"seller_id": "demo-seller-1"}}'
2. Open the returned link_url in a browser and click Allow.
3. Fetch the seller's access token:
   curl -s {base}/sellers/demo-seller-1/token -H 'Authorization: Bearer {api_key}'
4. Watch it work:
   curl -s {base}/metrics | grep -E '^broker_(link_attempts|token_exchanges|sellers)'
   curl -s {base}/sellers/demo-seller-1 -H 'Authorization: Bearer {api_key}'
"""
