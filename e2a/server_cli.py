"""Server-side CLI commands: `e2a serve` and `e2a admin ...` (users, keys, templates).

The client CLI (e2a/cli.py) loads this module only when `serve` or `admin` is invoked, so that
client commands never import the server's dependencies; this module does not import e2a.cli.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import click
from sqlalchemy import func, select, update

from e2a.config import Settings, SettingsError

# WebSocket messages from clients (PTY input, port proxy): at most 4 MiB each, at most 2 waiting,
# so a connection whose far end stops reading holds a few MiB of the server, not hundreds.
WS_MAX_MESSAGE = 4 * 1024 * 1024
WS_MAX_QUEUE = 2

# Exit status for invalid settings (the usage-error status, as for a bad option).
BAD_SETTINGS = 2


def load_settings() -> Settings:
    """The settings from the environment, or one line per bad value on stderr and exit 2."""
    try:
        return Settings()
    except SettingsError as e:
        for line in e.problems:
            click.echo(line, err=True)
        sys.exit(BAD_SETTINGS)


async def _with_db(fn, settings: Settings):
    from e2a.store import db as store

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = store.make_engine(settings.database_url)
    try:
        await store.migrate(engine)
        async with store.sessionmaker(engine)() as db:
            result = await fn(db)
            await db.commit()
            return result
    finally:
        await engine.dispose()


@click.command()
@click.option("--host", default=None, help="listen address (default 127.0.0.1, E2A_HOST)")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="listen port (default 8080, E2A_PORT)")
def serve(host: str | None, port: int | None) -> None:
    """Run the e2a server: API, sandbox host and store, on the embedded defaults."""
    settings = load_settings()  # before anything else: a bad value exits without touching the host

    import uvicorn

    from e2a.api.access import RedactTokens
    from e2a.api.app import create_app

    settings.host = host or settings.host
    settings.port = port or settings.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one line per proxied request (httpx) or Kubernetes API call (httpx2, lightkube's) is noise
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # loop="asyncio", not uvloop: asyncio spawns subprocesses with vfork (about 2 ms), libuv with
    # fork (about 18 ms for this process), and every sandbox start runs several (ip, runsc).
    for name in ("uvicorn.error", "uvicorn.access"):  # no URL token in the log
        logging.getLogger(name).addFilter(RedactTokens())
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, loop="asyncio",
                log_level="info", access_log=False, ws_max_size=WS_MAX_MESSAGE,
                ws_max_queue=WS_MAX_QUEUE, proxy_headers=bool(settings.trusted_proxies),
                forwarded_allow_ips=settings.trusted_proxies or None)



@click.command()
@click.option("--host", default="0.0.0.0", show_default=True,
              help="listen address (the node's: replicas call it there)")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="listen port (default 8335, E2A_KUBE_NODE_PORT)")
def node_agent(host: str, port: int | None) -> None:
    """Mount workspaces for the sandbox pods of this Kubernetes node."""
    settings = load_settings()
    from e2a.kube import node_agent as agent

    problems = agent.check(settings)
    if problems:
        for line in problems:
            click.echo(line, err=True)
        sys.exit(BAD_SETTINGS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(agent.serve(settings, host, port or settings.kube_node_port))

@click.group()
def admin() -> None:
    """Administer the e2a server (runs on the host)."""


@admin.command()
def bootstrap() -> None:
    """Create the first (admin) user and print its API key, once; no-op afterwards."""
    from e2a import auth
    from e2a.store.models import User

    async def go(db):
        if await db.scalar(select(func.count()).select_from(User)):
            return None
        user = await auth.create_user(db, "admin@localhost", settings.free_credits, is_admin=True)
        _, secret = await auth.create_key(db, user.id)
        return secret

    settings = load_settings()
    secret = asyncio.run(_with_db(go, settings))
    if secret:
        click.echo("Your e2a API key (shown once, stored hashed):")
        click.echo(f"  export E2A_API_KEY={secret}")
        click.echo(f"Its account (admin@localhost) has {settings.free_credits} free credits; add "
                   "more with `e2a admin grant admin@localhost CREDITS --reason WHY` "
                   "(docs/billing.md).")
    else:
        click.echo("e2a already has users; create more keys with `e2a admin create-key EMAIL`.")


@admin.command("create-user")
@click.argument("email")
@click.option("--admin", "is_admin", is_flag=True, help="make the user an administrator")
def create_user(email: str, is_admin: bool) -> None:
    """Create a user and print their first API key."""
    from e2a import auth

    settings = load_settings()

    async def go(db):
        user = await auth.create_user(db, email, settings.free_credits, is_admin=is_admin)
        _, secret = await auth.create_key(db, user.id)
        return user.id, secret

    try:
        user_id, secret = asyncio.run(_with_db(go, settings))
    except Exception as exc:  # unique email
        raise click.ClickException(f"cannot create {email}: {exc.__class__.__name__}") from exc
    click.echo(f"user_id={user_id}")
    click.echo(f"api_key={secret}")


@admin.command("create-key")
@click.argument("email_or_user_id")
def create_key(email_or_user_id: str) -> None:
    """Create another API key for an existing user."""
    from e2a import auth
    from e2a.store.models import User

    async def go(db):
        user = (await db.execute(select(User).where(
            (User.email == email_or_user_id) | (User.id == email_or_user_id)))).scalar_one_or_none()
        if user is None:
            return None
        row, secret = await auth.create_key(db, user.id)
        return row.id, secret

    found = asyncio.run(_with_db(go, load_settings()))
    if found is None:
        raise click.ClickException(f"no user {email_or_user_id!r}")
    click.echo(f"key_id={found[0]}")
    click.echo(f"api_key={found[1]}")


@admin.command("revoke-key")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke an API key at once."""
    from e2a.store.models import ApiKey

    async def go(db):
        res = await db.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked=True))
        return res.rowcount

    if not asyncio.run(_with_db(go, load_settings())):
        raise click.ClickException(f"no key {key_id!r}")
    click.echo(f"revoked {key_id}")


@admin.command("grant")
@click.argument("email_or_user_id")
@click.argument("credits")
@click.option("--reason", required=True, help="why (kept in the ledger entry, shown to the user)")
def grant(email_or_user_id: str, credits: str, reason: str) -> None:
    """Add CREDITS to a user's balance (negative to take them away), as a ledger adjustment."""
    from decimal import Decimal, InvalidOperation

    from e2a.billing.rates import to_credits
    from e2a.billing.service import Billing, BillingError

    try:
        amount = Decimal(credits)
    except InvalidOperation:
        raise click.BadParameter("must be a number of credits, such as 500 or -2.5",
                                 param_hint="CREDITS") from None
    if not amount.is_finite() or amount != amount.quantize(Decimal("0.000001")) or not amount:
        raise click.BadParameter("must be a non-zero number with at most 6 decimal places",
                                 param_hint="CREDITS")
    if not reason.strip():
        raise click.BadParameter("must say why", param_hint="--reason")
    settings = load_settings()
    try:
        user, balance = asyncio.run(_with_db(
            lambda db: Billing.grant(db, settings, email_or_user_id, amount, reason.strip(),
                                     actor="admin (e2a admin grant)"), settings))
    except BillingError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"{user.email} ({user.id}): {amount:+} credits; balance {to_credits(balance)}")


@admin.command("balances")
def balances() -> None:
    """Every account's balance, checked against the sum of its ledger."""
    from e2a.billing.rates import to_credits
    from e2a.billing.service import Billing

    rows = asyncio.run(_with_db(Billing.report, load_settings()))
    click.echo(f"{'email':40} {'user_id':26} {'balance':>16}  ledger")
    for r in rows:
        agrees = "agrees" if r["agrees"] else f"DISAGREES: ledger sums to {to_credits(r['ledger_micro'])}"
        click.echo(f"{r['email'][:40]:40} {r['user_id']:26} {to_credits(r['balance_micro']):>16}  "
                   f"{agrees}")
    if not all(r["agrees"] for r in rows):
        raise click.ClickException("some cached balances disagree with their ledgers")


@admin.command("rotate-secrets-key")
def rotate_secrets_key() -> None:
    """Re-encrypt every secret bundle under the current key (E2A_SECRETS_KEY, else
    <data_dir>/secrets.key); after it, E2A_SECRETS_OLD_KEYS can be dropped (docs/secrets.md)."""
    from e2a.secrets.bundles import rotate_all
    from e2a.secrets.crypto import SecretBox, SecretsKeyError

    settings = load_settings()
    try:
        box = SecretBox.from_settings(settings, create=False)
    except SecretsKeyError as exc:
        raise click.ClickException(str(exc)) from None
    done = asyncio.run(_with_db(lambda db: rotate_all(db, box), settings))
    click.echo(f"secret bundles re-encrypted: {done.rotated}; already under the current key: "
               f"{done.current}")
    if done.failed:
        raise click.ClickException(
            f"{len(done.failed)} secret bundle(s) open with none of the configured keys (or "
            f"were moved between rows) and were left as they are: {', '.join(done.failed)}. "
            "Keep E2A_SECRETS_OLD_KEYS until they are rotated or deleted.")


@admin.command("build-templates")
@click.argument("names", nargs=-1)
def build_templates(names: tuple[str, ...]) -> None:
    """Build template images (cached by content hash under the cache dir), step by step."""
    from e2a.templates import builder, recipes

    settings = load_settings()
    try:
        images = recipes.build_order(names or recipes.available())
    except recipes.RecipeError as exc:
        raise click.ClickException(str(exc)) from None
    log = settings.cache_dir / "templates" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for recipe in images:
        if builder.is_built(settings.cache_dir, recipe):
            click.echo(f"image {recipe.image}: cached "
                       f"({builder.rootfs_path(settings.cache_dir, recipe)})")
            continue
        click.echo(f"image {recipe.image}: building (output in {log})")
        with log.open("a") as out:
            try:
                builder.build(settings.cache_dir, recipe, log=out,
                              progress=lambda line: click.echo(line))
            except Exception as exc:
                raise click.ClickException(f"building {recipe.image} failed: {exc}; "
                                           f"see {log}") from None


@admin.command("image")
def image() -> None:
    """Build e2a's own OCI image (cached by content hash) and print its archive and name."""
    from pathlib import Path

    from e2a.deploy import image as e2a_image

    settings = load_settings()
    log = settings.cache_dir / "images" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        try:
            archive, name = e2a_image.build(settings.cache_dir, Path(settings.envd),
                                            settings.kube_registry, log=out,
                                            progress=lambda line: click.echo(line, err=True))
        except Exception as exc:
            raise click.ClickException(f"building e2a's image failed: {exc}; see {log}") from None
    click.echo(f"archive={archive}")
    click.echo(f"image={name}")
