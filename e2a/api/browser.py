"""The browser template's Chromium, over the DevTools protocol (CDP).

`GET /v1/sandboxes/{id}/browser` (API key) hands out `cdp_url`, a WebSocket URL with the
sandbox's CDP token in it; Playwright (`chromium.connect_over_cdp(cdp_url)`) or Puppeteer
(`connect({browserWSEndpoint})`) opens it as is. e2a relays it to Chromium's browser endpoint,
which listens on the sandbox's loopback only, through envd's signed relay.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, WebSocket

from e2a.api.access import Grant
from e2a.api.endpoints import (base_url, browser_ws_path, granted, link_slots, sandbox_with,
                               tokens)
from e2a.api.errors import ApiError, deny_websocket
from e2a.api.proxy import _opened, _relay, _ws_open
from e2a.api.schemas import BrowserOut

router = APIRouter(tags=["browser"])

# The largest CDP message relayed from Chromium (a screenshot is one message: a 1920×1080 PNG is
# a few MiB). What listens in the sandbox may be the sandbox's own code, and each stalled
# client holds up to two such messages in the server, so this stays small.
CDP_MAX_MESSAGE = 16 * 1024 * 1024


@router.get("/v1/sandboxes/{vm_id}/browser", response_model=BrowserOut,
            responses={401: {}, 404: {}, 409: {}})
async def browser(request: Request, vm_id: str) -> BrowserOut:
    """The CDP URL of the sandbox's Chromium. The token in it is this sandbox's alone and
    lasts as long as the sandbox: anyone holding the URL drives the browser."""
    sid, _ = await sandbox_with(request, vm_id, "cdp", "a CDP browser")
    token = tokens(request).issue(Grant(sid, "cdp", 0))
    return BrowserOut(cdp_url=f"{base_url(request, websocket=True)}/v1/browser/{token}")


@router.websocket("/v1/browser/{token}")
async def cdp(ws: WebSocket, token: str) -> None:
    try:
        grant, port = await granted(ws, token, "cdp", "cdp")
        link_slots.take(grant.sandbox_id)
    except ApiError as exc:
        return await deny_websocket(ws, exc)
    try:
        try:
            async with _opened((502, "browser_unreachable", "Chromium did not answer", None)):
                path = await browser_ws_path(ws.app.state.host, grant.sandbox_id, port)
        except ApiError as exc:
            return await deny_websocket(ws, exc)
        up = await _ws_open(ws, ws.app.state.host.agent_websocket(
            grant.sandbox_id, f"/proxy/{port}{path}", max_size=CDP_MAX_MESSAGE), "browser")
        if up is None:
            return
        await ws.accept()
        await _relay(ws, up)
    finally:
        link_slots.give(grant.sandbox_id)
