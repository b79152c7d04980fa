"""What the template-specific routes (browser, desktop, canvas) share: finding the caller's
sandbox of the right template, the URLs handed out, checking their tokens, the budget of link
connections, and finding Chromium's browser endpoint through envd's relay."""

from __future__ import annotations

import json

from fastapi import Request, WebSocket

from e2a.api.access import AccessTokens, Grant
from e2a.api.deps import awake, current_user, owned_sandbox, require_running
from e2a.api.errors import ApiError
from e2a.api.proxy import Slots
from e2a.templates import recipes

# Connections through a sandbox's URL-token links (CDP, live view, canvas view) at once: their
# own budget, well below the sandbox's 128, so whoever holds a link cannot lock the sandbox's
# owner out of it.
LINK_CONNECTIONS_PER_SANDBOX = 32
link_slots = Slots(LINK_CONNECTIONS_PER_SANDBOX,
                   "proxied connections may be open at once per sandbox through its links")


async def sandbox_with(request: Request, vm_id: str, endpoint: str, what: str) -> tuple[str, int]:
    """The caller's running sandbox whose template serves `endpoint`, and its port."""
    user = await current_user(request)
    rec = await owned_sandbox(request.app, user, vm_id)
    port = endpoint_port(rec.template, endpoint)
    if port is None:
        with_it = [n for n in recipes.available() if endpoint_port(n, endpoint)]
        raise ApiError(409, "wrong_template", f"sandbox {rec.id} is a {rec.template} sandbox; "
                       f"{what} is in {' and '.join(with_it)} sandboxes", "vm_id")
    request.app.state.host.touch(require_running(await awake(request.app, user, rec)))
    return rec.id, port


def endpoint_port(template: str, endpoint: str) -> int | None:
    recipe = recipes.load(template)
    return recipe.endpoints.get(endpoint) if recipe else None


def base_url(conn: Request | WebSocket, websocket: bool = False) -> str:
    """This server as the client reached it (or E2A_PUBLIC_URL), for URLs handed out."""
    public = conn.app.state.settings.public_url
    url = (public or str(conn.base_url)).rstrip("/")
    if websocket:
        url = "ws" + url[4:] if url.startswith("http") else url
    return url


def tokens(conn: Request | WebSocket) -> AccessTokens:
    return conn.app.state.access


async def granted(conn: Request | WebSocket, token: str | None, purpose: str,
                  endpoint: str) -> tuple[Grant, int]:
    """A token's grant and the port of its endpoint, if its sandbox still runs (else 404: the
    token outlived its sandbox)."""
    grant = tokens(conn).check(token, purpose)
    rec = await conn.app.state.catalog.get(grant.sandbox_id)
    port = endpoint_port(rec.template, endpoint) if rec else None
    if rec is None or rec.state != "running" or port is None:
        raise ApiError(404, "sandbox_not_found", f"sandbox {grant.sandbox_id} is not running")
    conn.app.state.host.touch(rec.id)
    return grant, port


VERSION_MAX = 64 * 1024  # Chromium's /json/version is a few hundred bytes


async def browser_ws_path(host, sid: str, port: int) -> str:
    """The path of Chromium's browser WebSocket (/devtools/browser/<id>), from /json/version
    (it changes each time Chromium starts)."""
    up = await host.agent_request(sid, "GET", f"/proxy/{port}/json/version")
    try:
        if up.response.status != 200:
            raise ApiError(502, "browser_unreachable",
                           f"Chromium in {sid} answered {up.response.status}")
        # Whatever listens on that port inside may be the sandbox's own code: read a bounded
        # answer, never the whole of it.
        raw = await up.response.content.read(VERSION_MAX + 1)
    finally:
        up.close()
    try:
        info = json.loads(raw) if len(raw) <= VERSION_MAX else None
    except ValueError:
        info = None
    url = info.get("webSocketDebuggerUrl") if isinstance(info, dict) else None
    path = url.split(f":{port}", 1)[-1] if isinstance(url, str) else ""
    if not path.startswith("/devtools/browser/"):
        raise ApiError(502, "browser_unreachable", f"Chromium in {sid} gave no browser endpoint")
    return path

