"""`broker`: the command line. `broker --help` and `broker <command> --help` say the rest."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import prometheus_client
import uvicorn
import uvloop
from alembic import command
from alembic.config import Config
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core import db, keys, keyservice, logs
from service.core.applications import Applications
from service.core.config import Settings, get_settings
from service.core.crypto import Keyring, generate_key_spec
from service.core.db import transaction
from service.core.domain import UNLINK_REASONS, Reason, Status
from service.core.runtime import utcnow
from service.core.schemas import OpenBreaker
from service.lifecycle import rekey
from service.ops import output
from service.ops.server import uvicorn_config
from service.serving import apikeys

ROOT = db.ROOT


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision (call outside a running event loop)."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


def _simulated(settings: Settings) -> Settings:
    """Without Mercado Pago credentials (dev only: production refuses to start without them),
    the settings that point at the built-in simulator. Imported here, not at the top: a
    production command never loads the simulator."""
    if not settings.uses_simulator:
        return settings
    from service.ops import demo

    return demo.with_simulator(settings)


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its caller (several servers share one loop)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(settings: Settings, url: str, *, simulated: bool) -> None:
    from service.main import create_app

    host = settings.broker_host
    servers = [
        QuietServer(
            uvicorn_config(
                create_app(settings, database_url=url),
                host,
                settings.broker_port,
                header_seconds=settings.broker_header_timeout_seconds,
                max_connections=settings.broker_max_connections,
            )
        )
    ]
    if simulated:
        from service.ops import demo
        from service.simulator import create_simulator_app

        sim_app = create_simulator_app(demo.simulator_config(settings))
        servers.append(QuietServer(uvicorn_config(sim_app, host, settings.broker_simulator_port)))

    def stop() -> None:
        # SIGTERM/SIGINT: stop accepting, let in-flight requests and exchanges finish.
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    await asyncio.gather(*(server.serve() for server in servers))
    if not all(server.started for server in servers):
        sys.exit(3)  # a start-up failed (its log line says why, e.g. keys.unavailable_at_start)


def cmd_run(settings: Settings, args: argparse.Namespace) -> None:
    from service.ops import demo  # the all-in-one dev command; production runs `broker serve`

    simulated = settings.uses_simulator
    settings = _simulated(settings)
    if not settings.production:
        # The all-in-one dev command refreshes too; production runs `broker refresher`.
        settings = settings.model_copy(update={"broker_serve_refresher": True})
    url = db.database_url(settings)
    migrate(url)
    if not settings.production:
        key = asyncio.run(_dev_key(settings, url))
        output.say(demo.banner(settings, key, simulated=simulated), flush=True)
    asyncio.run(_serve(settings, url, simulated=simulated))


async def _dev_key(settings: Settings, url: str) -> str:
    from service.ops import demo

    async with _sessions(settings, url) as sessions:
        return await demo.dev_api_key(sessions, settings.broker_data_dir)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    settings = _simulated(settings)  # expects `broker simulator` alongside
    url = db.database_url(settings)
    asyncio.run(_serve(settings, url, simulated=False))


async def _refresher(settings: Settings, url: str) -> None:
    from service.core.runtime import Runtime
    from service.ops import observe
    from service.ops.background import Background, refresher_of

    try:
        runtime = await Runtime.build(settings, url, application_name="broker-refresher")
    except keyservice.KeyServiceError as exc:  # logged as keys.unavailable_at_start
        output.fail(f"no data keys: the key service refused: {exc}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    if settings.broker_refresher_metrics_port:
        # This process has no API: its counters get a /metrics server of their own.
        prometheus_client.start_http_server(
            settings.broker_refresher_metrics_port, settings.broker_host
        )
    health = observe.Health(settings.broker_readiness_grace_seconds)
    background = Background(runtime, refresher_of(runtime), health, api=False)
    signalled = asyncio.ensure_future(stopping.wait())
    crashed = asyncio.ensure_future(background.wait())  # raises what ended a loop, if one does
    try:
        await asyncio.wait({signalled, crashed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        await background.stop()
    if crashed.done() and not crashed.cancelled():
        crashed.result()  # the process exits non-zero, after the same shutdown
    crashed.cancel()


async def _pause_switch(settings: Settings, action: str, reason: str | None) -> None:
    from service.refresh import breaker

    async with _sessions(settings) as sessions:
        if action == "pause":
            done = await breaker.pause(sessions, utcnow(), "cli", reason)
            output.say(
                "paused: no process refreshes until `broker refresher resume`"
                if done
                else "already paused"
            )
        elif action == "resume":
            done = await breaker.resume(sessions)
            output.say("resumed: due sellers are refreshed again" if done else "was not paused")
        else:
            async with sessions() as session:
                pause = await breaker.current_pause(session)
            output.say(
                f"paused since {pause.paused_at:%Y-%m-%d %H:%M:%S}Z by {pause.paused_by}"
                f" ({pause.reason or 'no reason given'})"
                if pause
                else "running"
            )


def cmd_refresher(settings: Settings, args: argparse.Namespace) -> None:
    if args.action != "run":
        asyncio.run(_pause_switch(settings, args.action, args.reason))
        return
    settings = _simulated(settings)
    asyncio.run(_refresher(settings, db.database_url(settings)))


async def _events(settings: Settings, args: argparse.Namespace) -> None:
    from service.lifecycle import events

    async with _sessions(settings) as sessions:
        if args.action == "replay":
            if not args.event_ids and not args.all_failed:
                output.fail("name event ids, or --all-failed")
            count = await events.replay(
                sessions, settings, utcnow(), args.event_ids, all_failed=args.all_failed
            )
            output.say(f"queued {count} delivery(ies) again")
            return
        async with sessions() as session:
            rows = await events.list_events(session, args.limit, failed_only=args.failed)
    for event, delivery in rows:
        state = (
            f"{delivery.subscriber}:{delivery.state} x{delivery.attempts}"
            f"{' ' + delivery.last_error if delivery.last_error else ''}"
            if delivery
            else "no subscriber"
        )
        output.say(
            f"{event.created_at:%Y-%m-%d %H:%M:%S}\t{event.id}\t{event.type}\t"
            f"{event.seller_id}@v{event.seller_version}\t{state}"
        )


def cmd_events(settings: Settings, args: argparse.Namespace) -> None:
    asyncio.run(_events(settings, args))


async def _sellers(settings: Settings, args: argparse.Namespace) -> None:
    from service.core.models import Seller
    from service.core.schemas import SellerStatus
    from service.lifecycle import sellers

    if args.action == "mark-restored":
        async with _sessions(settings) as sessions:
            marked = await sellers.mark_restored(
                sessions,
                await _keyring(settings, sessions),
                utcnow(),
                timedelta(minutes=args.spread_minutes),
                report=_count_bar,
            )
        output.note()
        output.say(f"marked {marked} linked seller(s); each is re-validated soon")
        return
    if args.action == "unlink":
        async with _sessions(settings) as sessions:
            done = await sellers.unlink(
                sessions, settings, utcnow(), args.seller_id, Reason(args.reason), actor="cli"
            )
        output.say(f"unlinked {args.seller_id}" if done else f"no linked seller {args.seller_id!r}")
        if not done:
            sys.exit(1)
        return
    async with _sessions(settings) as sessions, sessions() as session:
        if args.action == "show":
            seller = await session.get(Seller, args.seller_id)
            if seller is None:
                output.fail(f"no seller {args.seller_id!r}")
            output.say(SellerStatus.of(seller, settings.apps).model_dump_json(indent=2))
            return
        query = sellers.page_query(None, None, args.status, args.expiring_before, None, args.limit)
        found = list(await session.scalars(query))
    for seller in found[: args.limit]:
        output.say(
            f"{seller.seller_id}\t{seller.status}"
            f"{'(' + seller.status_reason + ')' if seller.status_reason else ''}\t"
            f"expires {seller.expires_at:%Y-%m-%d %H:%M}Z\tv{seller.version}"
        )
    if len(found) > args.limit:
        output.say(f"... more than {args.limit}; use --limit or GET /sellers with a cursor")


def _count_bar(done: int, total: int) -> None:
    output.progress(done, total)


def cmd_sellers(settings: Settings, args: argparse.Namespace) -> None:
    asyncio.run(_sellers(settings, args))


async def _breakers(settings: Settings, client_id: str | None, *, close: bool) -> None:
    from service.refresh import breaker

    async with _sessions(settings) as sessions:
        if close:
            output.say(f"closed {await breaker.close(sessions, client_id)} breaker(s)")
            return
        async with sessions() as session:
            rows = await breaker.open_breakers(session)
    apps = _simulated(settings).apps
    for row in rows:
        output.say(
            f"{apps.name_of(row.client_id)}\t{row.client_id}\topen\t{row.reason}"
            f"\tsince {row.tripped_at:%Y-%m-%d %H:%M:%S}Z"
        )
    if not rows:
        output.say("no open breaker: refreshing runs for every application")


def cmd_breaker(settings: Settings, args: argparse.Namespace) -> None:
    # An application by name, or by client_id (also one no longer configured).
    named = getattr(args, "application", None)
    app = _simulated(settings).apps.get(named) if named else None
    client_id = app.client_id if app is not None else named
    asyncio.run(_breakers(settings, client_id, close=args.action == "close"))


async def _applications(settings: Settings) -> None:
    from service.lifecycle import applications

    apps = _simulated(settings).apps
    async with _sessions(settings) as sessions, sessions() as session:
        found = await applications.summaries(session, apps.values(), utcnow())
    rows = [
        (
            "NAME",
            "CLIENT_ID",
            "LINKED",
            "RELINK_REQUIRED",
            "UNLINKED",
            "BREAKER",
            "BACKLOG",
            "NEXT_DUE",
        )
    ]
    for app in found:
        breaker = app.breaker
        rows.append(
            (
                app.name,
                app.client_id,
                str(app.sellers.linked),
                str(app.sellers.relink_required),
                str(app.sellers.unlinked),
                f"open ({breaker.reason})" if isinstance(breaker, OpenBreaker) else "closed",
                str(app.refresh_backlog),
                f"{app.next_refresh_at:%Y-%m-%d %H:%M}Z" if app.next_refresh_at else "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        output.say("  ".join(cells).rstrip())


def cmd_applications(settings: Settings, args: argparse.Namespace) -> None:
    asyncio.run(_applications(settings))


def _progress_bar(progress: rekey.Progress) -> None:
    leased = progress.skipped_leased
    aside = f"{leased} under a refresh lease, for a later run" if leased else ""
    output.progress(progress.done, progress.total, aside)


async def _keyring(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> Keyring:
    """The data keys, as a broker process holds them (one try at the key service)."""
    service = keyservice.from_settings(settings)
    try:
        return await keys.open_keyring(settings, sessions, service)
    except keyservice.KeyServiceError as exc:
        output.fail(f"the key service refused: {exc}")
    finally:
        if service is not None:
            await service.aclose()


async def _reencrypt(settings: Settings, batch_size: int) -> rekey.Progress:
    async with _sessions(settings) as sessions:
        keyring = await _keyring(settings, sessions)
        return await rekey.reencrypt(sessions, keyring, utcnow, batch_size, _progress_bar)


async def _data_keys(settings: Settings, args: argparse.Namespace) -> None:
    """`broker keys add|promote|rewrap|import|list`: the data keys a key service wraps."""
    service = keyservice.from_settings(settings)
    if service is None:
        output.fail("set BROKER_KEY_SERVICE=transit (and its settings) first")
    try:
        async with _sessions(settings) as sessions:
            if args.action == "add":
                key_id = await keys.add(sessions, service)
                output.say(
                    f"added {key_id}: it opens, it does not seal yet; once every process has "
                    f"re-read the keys (BROKER_KEY_CHECK_SECONDS): broker keys promote {key_id}"
                )
            elif args.action == "promote":
                if not await keys.promote(sessions, args.key_id):
                    output.fail(f"no data key {args.key_id!r} (see: broker keys list)")
                output.say(f"{args.key_id} seals from the next check of every process on")
            elif args.action == "rewrap":
                count = await keys.rewrap(sessions, service)
                output.say(f"rewrapped {count} data key(s) under {service.name}'s newest version")
            elif args.action == "import":
                spec = settings.broker_import_keys
                if spec is None:
                    output.fail("put the keys to import in BROKER_IMPORT_KEYS (or its file)")
                imported = await keys.import_local(sessions, service, spec.get_secret_value())
                done = ", ".join(imported) or "nothing new"
                output.say(f"imported {done}; see: broker keys list")
            else:
                for row in await keys.listing(sessions):
                    version = row.wrapped.split(":")[1] if row.wrapped.count(":") >= 2 else "-"
                    promoted = f"{row.promoted_at:%Y-%m-%d %H:%M:%S}" if row.promoted_at else "-"
                    output.say(
                        f"{row.key_id}\t{row.wrapped_by} {version}\t"
                        f"created {row.created_at:%Y-%m-%d %H:%M:%S}\tpromoted {promoted}"
                    )
    except keyservice.KeyServiceError as exc:
        output.fail(f"the key service refused: {exc}")
    finally:
        await service.aclose()


def cmd_keys(settings: Settings, args: argparse.Namespace) -> None:
    if args.action == "generate":
        output.say(generate_key_spec(args.key_id))
        return
    if args.action != "reencrypt":
        asyncio.run(_data_keys(settings, args))
        return
    progress = asyncio.run(_reencrypt(settings, args.batch_size))
    output.note()
    left = progress.total - progress.done
    output.say(f"re-encrypted {progress.done} row(s) under the primary key; {left} left")
    if left:
        sys.exit(3)  # run again once the leased rows are free


async def _audit(settings: Settings, args: argparse.Namespace) -> None:
    from service.lifecycle import audit

    async with _sessions(settings) as sessions:
        if args.action == "prune":
            events, attempts, links = await audit.prune(
                sessions,
                utcnow(),
                settings.broker_audit_retention_days,
                settings.broker_attempt_retention_days,
            )
            output.say(
                f"pruned {events} audit event(s), {attempts} link attempt(s), {links} link(s)"
            )
            return
        async with sessions() as session:
            rows = await audit.query(session, args.seller, args.actor, None, args.limit)
    for row in rows:
        times = f" x{row.count}" if row.count > 1 else ""
        output.say(
            f"{row.at:%Y-%m-%d %H:%M:%S}\t{row.actor}\t{row.action}{times}\t"
            f"{row.seller_id or '-'}\t{row.detail or ''}"
        )


def cmd_audit(settings: Settings, args: argparse.Namespace) -> None:
    asyncio.run(_audit(settings, args))


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    migrate(db.database_url(settings))
    output.say("schema is at head")


def cmd_simulator(settings: Settings, args: argparse.Namespace) -> None:
    if settings.production:
        output.fail("the simulator never runs in production mode")
    from service.ops import demo
    from service.simulator import create_simulator_app

    settings = _simulated(settings)
    app = create_simulator_app(demo.simulator_config(settings))
    uvicorn.run(app, host=settings.broker_host, port=settings.broker_simulator_port)


@asynccontextmanager
async def _sessions(
    settings: Settings, url: str | None = None
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A small engine for one command (`url` when the caller already resolved the database)."""
    engine = db.make_engine(url or db.database_url(settings), "broker-cli", pool_size=1)
    try:
        yield db.make_sessionmaker(engine)
    finally:
        await engine.dispose()


async def _api_keys(settings: Settings, args: argparse.Namespace) -> None:
    apps = _simulated(settings).apps
    # Resolved before the database is touched: an unknown name stores nothing.
    client_ids = _client_ids(apps, args.applications) if args.action == "create" else None
    lines = []
    async with _sessions(settings) as sessions, transaction(sessions) as session:
        if args.action == "create":
            scopes = tuple(args.scopes.split(",")) if args.scopes else apikeys.SCOPES
            _, secret = await apikeys.create(
                session, args.name, utcnow(), scopes, args.namespace, client_ids
            )
            lines.append(secret)
        elif args.action == "revoke":
            if not await apikeys.revoke(session, args.name, utcnow()):
                output.fail(f"no active key named {args.name!r}")
            lines.append(f"revoked {args.name}")
        else:
            for key in await apikeys.list_keys(session):
                state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
                granted = ",".join(key.scopes)
                reach = (
                    "*"
                    if key.client_ids is None
                    else ",".join(apps.name_of(client_id) for client_id in key.client_ids)
                )
                lines.append(
                    f"{key.name}\tmpb_{key.prefix}_…\t{granted}\t{key.namespace or '*'}\t"
                    f"{reach}\t{state}"
                )
    output.say("\n".join(lines))  # after the commit: a printed key exists
    if args.action == "create":
        output.note("Store it now: only its digest is kept.")


def _client_ids(apps: Applications, names: list[str] | None) -> list[str] | None:
    """The client_ids of the named applications (None: the key reaches every application)."""
    if names is None:
        return None
    unknown = [name for name in names if name not in apps]
    if unknown:
        raise ValueError(
            f"unknown application(s): {', '.join(unknown)} (configured: {', '.join(apps)})"
        )
    return sorted({apps[name].client_id for name in names})


def cmd_api_keys(settings: Settings, args: argparse.Namespace) -> None:
    try:
        asyncio.run(_api_keys(settings, args))
    except ValueError as exc:
        output.fail(str(exc))


def cmd_openapi(settings: Settings, args: argparse.Namespace) -> None:
    from service.main import create_app

    spec = json.dumps(create_app(settings).openapi(), indent=2, sort_keys=False) + "\n"
    if args.output == "-":
        output.write(spec)
    else:
        Path(args.output).write_text(spec)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broker", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "dev"):
        sub.add_parser(
            name,
            help="migrate, then serve API + refresher (the demo, on the built-in simulator and "
            "embedded PostgreSQL, when no MP credentials are set)",
        )
    sub.add_parser("serve", help="serve the API")
    sub.add_parser("migrate", help="apply the Alembic migrations")
    sub.add_parser("simulator", help="run the Mercado Pago simulator (dev only)")
    refresher = sub.add_parser(
        "refresher", help="run the background refresher, or pause/resume it everywhere"
    )
    refresher.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=("run", "pause", "resume", "status"),
        help="run (default): refresh due sellers and deliver events; pause/resume: the "
        "global switch, obeyed by every process at its next claim; status: show it",
    )
    refresher.add_argument("--reason", help="why (with pause; shown by status)")
    events_cmd = sub.add_parser("events", help="events to internal services").add_subparsers(
        dest="action", required=True
    )
    listed = events_cmd.add_parser("list", help="newest events first, with delivery state")
    listed.add_argument("--failed", action="store_true", help="only deliveries parked as failed")
    listed.add_argument("--limit", type=int, default=50)
    replay = events_cmd.add_parser("replay", help="deliver events again")
    replay.add_argument("event_ids", nargs="*", help="events to send again to every subscriber")
    replay.add_argument("--all-failed", action="store_true", help="every failed delivery")
    sellers_cmd = sub.add_parser("sellers", help="linked sellers").add_subparsers(
        dest="action", required=True
    )
    seller_list = sellers_cmd.add_parser("list", help="sellers in seller_id order")
    seller_list.add_argument("--status", choices=tuple(Status))
    seller_list.add_argument(
        "--expiring-before", type=datetime.fromisoformat, help="ISO date, e.g. 2027-01-31"
    )
    seller_list.add_argument("--limit", type=int, default=100)
    seller_show = sellers_cmd.add_parser("show", help="one seller's status (never a secret)")
    seller_show.add_argument("seller_id")
    seller_unlink = sellers_cmd.add_parser(
        "unlink", help="destroy a seller's stored tokens (local: Mercado Pago has no revoke)"
    )
    seller_unlink.add_argument("seller_id")
    seller_unlink.add_argument(
        "--reason", choices=UNLINK_REASONS, default=Reason.UNLINKED_BY_OPERATOR
    )
    restored = sellers_cmd.add_parser(
        "mark-restored",
        help="after a database restore or a lagging failover: re-validate every refresh token "
        "soon, so one Mercado Pago already rotated becomes relink_required (rotation_lost)",
    )
    restored.add_argument(
        "--spread-minutes",
        type=float,
        default=60,
        help="re-validate within this many minutes (spreads the load on Mercado Pago)",
    )
    audit_cmd = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="action", required=True
    )
    show = audit_cmd.add_parser("list", help="newest events first")
    show.add_argument("--seller")
    show.add_argument("--actor")
    show.add_argument("--limit", type=int, default=50)
    audit_cmd.add_parser("prune", help="enforce the retention settings now")
    keys_cmd = sub.add_parser("keys", help="encryption keys").add_subparsers(
        dest="action", required=True
    )
    generate = keys_cmd.add_parser("generate", help="print a new key_id:key entry")
    generate.add_argument("key_id")
    reencrypt = keys_cmd.add_parser("reencrypt", help="reseal every value under the primary key")
    reencrypt.add_argument("--batch-size", type=int, default=200)
    # With BROKER_KEY_SERVICE=transit: the wrapped data keys (service/core/keys.py).
    keys_cmd.add_parser("list", help="the data keys the key service wraps (never a key)")
    keys_cmd.add_parser("add", help="a new data key that opens; promote it to seal")
    promote = keys_cmd.add_parser("promote", help="the data key that seals from now on")
    promote.add_argument("key_id")
    keys_cmd.add_parser(
        "rewrap", help="after rotating the Transit key: rewrap the data keys (no seller row)"
    )
    keys_cmd.add_parser(
        "import", help="wrap BROKER_IMPORT_KEYS (the old BROKER_ENCRYPTION_KEYS) into data keys"
    )
    breakers = sub.add_parser("breaker", help="per-application refresh breakers").add_subparsers(
        dest="action", required=True
    )
    breakers.add_parser("list", help="show open breakers")
    close = breakers.add_parser("close", help="resume refreshing (one application, or all)")
    close.add_argument("application", nargs="?", help="its name or client_id; none: all")
    applications_cmd = sub.add_parser(
        "applications", help="the configured Mercado Pago applications"
    ).add_subparsers(dest="action", required=True)
    applications_cmd.add_parser(
        "list", help="each application's sellers by status, breaker, refresh backlog, next due"
    )
    keys = sub.add_parser("api-keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create", help="create a key and print its secret once")
    create.add_argument("name")
    create.add_argument("--scopes", help=f"comma-separated, of {', '.join(apikeys.SCOPES)}")
    create.add_argument("--namespace", help="limit the key to seller ids with this prefix")
    create.add_argument(
        "--application",
        action="append",
        dest="applications",
        metavar="NAME",
        help="limit the key to this application (repeat for several; default: all)",
    )
    keys.add_parser("list", help="list keys (never their secrets)")
    revoke = keys.add_parser("revoke", help="revoke a key by name or prefix")
    revoke.add_argument("name")
    spec = sub.add_parser("openapi", help="write the OpenAPI document")
    spec.add_argument("--output", default="openapi/openapi.json")
    return p


COMMANDS = {
    "run": cmd_run,
    "dev": cmd_run,
    "events": cmd_events,
    "sellers": cmd_sellers,
    "serve": cmd_serve,
    "migrate": cmd_migrate,
    "simulator": cmd_simulator,
    "refresher": cmd_refresher,
    "keys": cmd_keys,
    "audit": cmd_audit,
    "breaker": cmd_breaker,
    "applications": cmd_applications,
    "api-keys": cmd_api_keys,
    "openapi": cmd_openapi,
}


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    # libuv's event loop for every command (uvicorn's own `loop` option applies only to
    # `uvicorn.run`, not to servers started inside our asyncio.run).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        settings = get_settings()
    except ValidationError as exc:
        # Name the settings at fault; never print their values.
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        output.fail(f"broker: invalid settings: {problems}")
    logs.configure(
        json_lines=settings.broker_log_format == "json"
        or (settings.broker_log_format == "auto" and settings.production),
        level=settings.broker_log_level,
    )
    COMMANDS[args.command](settings, args)


if __name__ == "__main__":
    main()
