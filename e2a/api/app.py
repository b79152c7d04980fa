"""The FastAPI application: routes, error shape, and the sandbox manager's lifetime."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI

from e2a import __version__, auth
from e2a.agents import ssrf
from e2a.agents.egress import Egress
from e2a.agents.tasks import Tasks
from e2a.api import (billing, browser, canvas, desktop, errors, proxy, sandboxes, secrets,
                     sessions, tasks, templates, workspaces)
from e2a.accounts.mail import Mailer
from e2a.accounts.service import Accounts
from e2a.api import accounts as accounts_api
from e2a.api.access import AccessTokens
from e2a.api.guard import RequestGuard
from e2a.api.hop_tokens import HopTokens
from e2a.billing.service import Billing
from e2a.billing.stripe_gateway import StripeGateway
from e2a.config import Settings
from e2a.sandboxes.manager import Manager, StartupError, retry
from e2a.secrets.bundles import Bundles
from e2a.secrets.crypto import SecretBox, SecretsKeyError
from e2a.sessions.service import Sessions
from e2a.sessions.tokens import SessionTokens
from e2a.store import db as store

log = logging.getLogger("e2a")


class JsonByDefault:
    """`curl -d '{...}'` sends JSON labelled as a form; every JSON route here reads it as JSON.

    Only POST bodies without a type or with curl's default form type are relabelled; the port
    proxy passes requests to the sandbox untouched.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and "/ports/" not in scope["path"]:
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            ctype = dict(scope["headers"]).get(b"content-type", b"")
            if ctype in (b"", b"application/x-www-form-urlencoded"):
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, *, with_runtime: bool = True) -> FastAPI:
    """`with_runtime=False` builds the app without touching the host (for the OpenAPI document)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = store.make_engine(settings.database_url)
        try:
            await retry("reach the database and bring its schema up to date",
                        lambda: store.migrate(engine))
        except StartupError as exc:
            log.critical("e2a cannot start: %s", exc)
            await engine.dispose()
            raise
        app.state.sessions = store.sessionmaker(engine)
        try:  # the secret bundles' master key: no start without a safe one (docs/secrets.md)
            app.state.secrets = Bundles(app.state.sessions, SecretBox.from_settings(settings))
        except SecretsKeyError as exc:
            log.critical("e2a cannot start: %s", exc)
            await engine.dispose()
            raise
        app.state.keys = auth.KeyCache()
        if settings.backend == "kubernetes":  # docs/kubernetes.md
            from e2a.kube.host import KubeHost
            manager = KubeHost(settings, app.state.sessions)
        else:
            manager = Manager(settings, app.state.sessions)
        # The API sees the manager only through its two interfaces (sandboxes/host.py).
        app.state.host, app.state.catalog = manager, manager.catalog
        app.state.workspaces = manager.workspaces
        app.state.access = AccessTokens(manager.keys)
        app.state.accounts = Accounts(app.state.sessions, manager.keys, settings,
                                      Mailer(settings), key_cache=app.state.keys)
        app.state.login_tokens = app.state.accounts.tokens  # deps.caller_from_header's
        app.state.hop_tokens = HopTokens(manager.keys)  # follow-ups passed between replicas
        try:
            await manager.start()
        except StartupError as exc:
            log.critical("e2a cannot start: %s", exc)
            await manager.stop()
            await engine.dispose()
            raise
        policy = ssrf.Policy.from_settings(settings)   # what e2a calls for callers
        app.state.tasks = Tasks(app.state.sessions, manager, Egress(
            {v: getattr(settings, f"llm_{v}_url") for v in ("anthropic", "openai", "google",
                                                             "deepseek")},
            settings.egress_port, policy=policy), human_in_control=app.state.human_control.held,
            policy=policy, own_url=replica_url(settings))
        try:
            await app.state.tasks.start()
        except OSError as exc:
            log.critical("e2a cannot start the LLM egress proxy on port %s: %s",
                         settings.egress_port, exc)
            await manager.stop()
            await engine.dispose()
            raise
        app.state.chat_sessions = Sessions(
            app.state.sessions, manager, manager.catalog, app.state.tasks, app.state.secrets,
            SessionTokens(manager.keys), settings, check_url=sessions.url_guard(settings))
        await app.state.chat_sessions.start()
        # Credits: metering from the sandbox feed, purchases through Stripe (docs/billing.md).
        app.state.billing = Billing(app.state.sessions, settings, manager, manager.catalog,
                                    StripeGateway.from_settings(settings), manager.workspaces)
        await app.state.billing.start()
        log.info("e2a %s serving on %s:%s", __version__, settings.host, settings.port)
        try:
            yield
        finally:
            await app.state.billing.stop()
            await app.state.chat_sessions.stop()
            await app.state.tasks.stop()
            await manager.stop()
            await engine.dispose()

    app = FastAPI(
        title="e2a",
        version=__version__,
        description="Disposable, gVisor-isolated Linux sandboxes for AI agents.",
        lifespan=lifespan if with_runtime else None,
    )
    app.state.settings = settings
    app.state.human_control = desktop.HumanControl()
    app.add_middleware(JsonByDefault)
    # Added last, so it runs first: no route (nor JsonByDefault) sees an unauthenticated request.
    app.add_middleware(RequestGuard, max_body=settings.max_body_bytes)
    errors.install(app)
    app.include_router(sandboxes.router)
    app.include_router(proxy.router)
    app.include_router(templates.router)
    app.include_router(browser.router)
    app.include_router(desktop.router)
    app.include_router(canvas.router)
    app.include_router(workspaces.router)
    app.include_router(secrets.router)
    app.include_router(tasks.router)
    app.include_router(sessions.router)
    app.include_router(billing.router)
    app.include_router(accounts_api.router)
    desktop.mount_novnc(app)

    @app.get("/health", tags=["service"])
    async def health() -> dict:
        """Liveness, and how many pre-started sandboxes wait in the warm pool per template."""
        sandboxes = getattr(app.state, "host", None)
        pool = sandboxes.pool_sizes() if sandboxes else {}
        return {"status": "ok", "version": __version__, "pool": pool}

    return app


def replica_url(settings) -> str | None:
    """Where the other replicas reach this one's API (E2A_REPLICA_URL, or its own address
    unless it listens on every one, or on loopback: another host's loopback is not it)."""
    if settings.replica_url:
        return settings.replica_url.rstrip("/")
    if settings.host in ("", "0.0.0.0", "::", "localhost") or settings.host.startswith("127.") \
            or settings.host == "::1":
        return None
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"
