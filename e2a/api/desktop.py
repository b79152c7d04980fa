"""The cua template's desktop: computer-use actions, screenshots, windows, and a live view a
person can take over.

Actions and screenshots go to envd's X client (guest/desktop.go). The live view is noVNC (from
Debian's package, served under /v1/novnc/) on a page of e2a's, its WebSocket relayed to one of
two x11vnc servers on the sandbox's loopback: a view-only one, and one that takes input. A
person who connects to the second holds control: until that connection ends (or the owner
ends it with DELETE .../desktop/control), the actions API answers 409 `human_in_control`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from e2a.api.access import Grant
from e2a.api.endpoints import base_url, granted, link_slots, sandbox_with, tokens
from e2a.api.errors import ApiError, deny_websocket
from e2a.api.proxy import _relay, _ws_open, forward
from e2a.api.schemas import ControlOut, StreamOut, StreamRequest

router = APIRouter(tags=["desktop"])

NOVNC_DIR = Path("/usr/share/novnc")   # Debian's novnc package
MAX_ACTIONS = 100
WHAT = "a desktop"


class HumanControl:
    """Which sandboxes a person controls through the live view, and their connections."""

    def __init__(self) -> None:
        self._holders: dict[str, set[WebSocket]] = defaultdict(set)
        self._ended_at: dict[str, float] = {}  # links issued before this cannot take control

    def may_take(self, grant: Grant) -> bool:
        return grant.issued > self._ended_at.get(grant.sandbox_id, 0.0)

    def held(self, sandbox_id: str) -> bool:
        return bool(self._holders.get(sandbox_id))

    def take(self, sandbox_id: str, ws: WebSocket) -> None:
        self._holders[sandbox_id].add(ws)

    def give(self, sandbox_id: str, ws: WebSocket) -> None:
        holders = self._holders.get(sandbox_id)
        if holders is not None:
            holders.discard(ws)
            if not holders:
                del self._holders[sandbox_id]

    async def end(self, sandbox_id: str) -> None:
        """Close a person's control connections, and keep the links issued so far from taking
        control again (a new stream gives a new link)."""
        self._ended_at[sandbox_id] = time.time()
        for ws in list(self._holders.pop(sandbox_id, ())):
            try:
                await ws.close(code=4000, reason="control handed back by the owner")
            except RuntimeError:
                pass  # already closed


def _control(conn: Request | WebSocket) -> HumanControl:
    return conn.app.state.human_control


def _not_held(conn: Request, sid: str) -> None:
    if _control(conn).held(sid):
        raise ApiError(409, "human_in_control", f"a person controls the desktop of {sid} through "
                       "the live view; actions resume when they hand it back")


def _action_list(body: object) -> list:
    """One action, a list of them, or {"actions": [...]}."""
    if isinstance(body, dict) and "actions" in body:
        body = body["actions"]
    elif isinstance(body, dict):
        body = [body]
    if not isinstance(body, list):
        raise ApiError(400, "invalid_action", "the body is an action, a list of actions, or "
                       '{"actions": [...]}', "actions")
    if not body:
        raise ApiError(400, "invalid_action", "no action given", "actions")
    if len(body) > MAX_ACTIONS:
        raise ApiError(400, "invalid_action", f"at most {MAX_ACTIONS} actions per call",
                       "actions")
    return body


@router.post("/v1/sandboxes/{vm_id}/desktop/actions", responses={400: {}, 404: {}, 409: {}})
async def actions(request: Request, vm_id: str) -> Response:
    """Run computer-use actions in order (Anthropic's computer-use action set); returns
    `{"results": [...]}`, one per action, once their effect is done."""
    sid, _ = await sandbox_with(request, vm_id, "vnc_view", WHAT)
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise ApiError(400, "invalid_json", "the body is not JSON") from None
    listed = _action_list(body)
    _not_held(request, sid)
    return await forward(request, request.app.state.host, sid, "POST", "/desktop/actions",
                         json={"actions": listed})


@router.get("/v1/sandboxes/{vm_id}/desktop/screenshot", responses={
    200: {"content": {"image/png": {}}}, 404: {}, 409: {}})
async def screenshot(request: Request, vm_id: str,
                     width: int | None = Query(default=None, ge=16, le=7680)) -> Response:
    """The screen as PNG, scaled to `width` if given (never up)."""
    sid, _ = await sandbox_with(request, vm_id, "vnc_view", WHAT)
    params = {"width": width} if width else None
    return await forward(request, request.app.state.host, sid, "GET", "/desktop/screenshot",
                         params=params)


@router.get("/v1/sandboxes/{vm_id}/desktop/windows", responses={404: {}, 409: {}})
async def windows(request: Request, vm_id: str) -> Response:
    """The desktop's windows: title, class, geometry, which has the focus (screen parsing)."""
    sid, _ = await sandbox_with(request, vm_id, "vnc_view", WHAT)
    return await forward(request, request.app.state.host, sid, "GET", "/desktop/windows")


@router.get("/v1/sandboxes/{vm_id}/desktop/cursor", responses={404: {}, 409: {}})
async def cursor(request: Request, vm_id: str) -> Response:
    sid, _ = await sandbox_with(request, vm_id, "vnc_view", WHAT)
    return await forward(request, request.app.state.host, sid, "GET", "/desktop/cursor")


@router.post("/v1/sandboxes/{vm_id}/desktop/stream", response_model=StreamOut,
             responses={404: {}, 409: {}})
async def stream(request: Request, vm_id: str, req: StreamRequest | None = None) -> StreamOut:
    """A live-view page URL, with a token that expires after `ttl_seconds` (the API key is
    not in it). With `view_only: false` the person watching can take control."""
    req = req or StreamRequest()
    sid, _ = await sandbox_with(request, vm_id, "vnc_view", WHAT)
    expires = int(time.time()) + req.ttl_seconds
    token = tokens(request).issue(Grant(sid, "desktop", expires, req.view_only))
    return StreamOut(url=f"{base_url(request)}/v1/desktop/{token}/", view_only=req.view_only,
                     expires_at=datetime.fromtimestamp(expires, timezone.utc))


@router.get("/v1/sandboxes/{vm_id}/desktop/control", response_model=ControlOut,
            responses={404: {}, 409: {}})
async def control(request: Request, vm_id: str) -> ControlOut:
    sid, _ = await sandbox_with(request, vm_id, "vnc_view", WHAT)
    return ControlOut(human_in_control=_control(request).held(sid))


@router.delete("/v1/sandboxes/{vm_id}/desktop/control", response_model=ControlOut,
               responses={404: {}, 409: {}})
async def end_control(request: Request, vm_id: str) -> ControlOut:
    """The owner takes the desktop back: a person's control connections are closed."""
    sid, _ = await sandbox_with(request, vm_id, "vnc_view", WHAT)
    await _control(request).end(sid)
    return ControlOut(human_in_control=False)


# ---- the live view: a page, and its VNC WebSocket -------------------------------------------

@router.get("/v1/desktop/{token}/", response_class=HTMLResponse, responses={401: {}, 404: {}})
async def view_page(request: Request, token: str) -> HTMLResponse:
    grant, _ = await granted(request, token, "desktop", "vnc_view")
    # The VNC servers' passwords, for this page's noVNC: the view server's, and the control
    # server's when the link may take control (both servers are reachable only through e2a).
    keys = tokens(request)
    # A fork's VNC servers run from its origin's memory, with its origin's passwords.
    rec = await request.app.state.catalog.get(grant.sandbox_id)
    owner = (rec.secrets_of if rec else None) or grant.sandbox_id
    config = {"view": keys.vnc_password(owner, "view"),
              "control": None if grant.view_only else keys.vnc_password(owner, "control")}
    page = VIEW_PAGE.replace("{{SANDBOX}}", html.escape(grant.sandbox_id)).replace(
        "{{CONFIG}}", json.dumps(config))
    return HTMLResponse(page, headers={"Cache-Control": "no-store",
                                       "Referrer-Policy": "no-referrer"})


@router.websocket("/v1/desktop/{token}/vnc")
async def vnc(ws: WebSocket, token: str, mode: str = "view") -> None:
    try:
        if mode not in ("view", "control"):
            raise ApiError(400, "invalid_field", "mode is view or control", "mode")
        grant, port = await granted(ws, token, "desktop", f"vnc_{mode}")
        if mode == "control" and grant.view_only:
            raise ApiError(403, "view_only", "this live view is view-only")
        if mode == "control" and not _control(ws).may_take(grant):
            raise ApiError(403, "control_ended", "the owner took the desktop back; ask for a "
                           "new live view")
        link_slots.take(grant.sandbox_id)
    except ApiError as exc:
        return await deny_websocket(ws, exc)
    sid = grant.sandbox_id
    try:
        up = await _ws_open(ws, ws.app.state.host.agent_websocket(sid, f"/tcp/{port}"),
                            "desktop")
        if up is None:
            return
        await ws.accept(subprotocol="binary" if "binary" in ws.scope.get("subprotocols", ())
                        else None)
        if mode == "control":
            _control(ws).take(sid, ws)
        try:
            # the link's expiry ends an open view too, not only new connections
            await asyncio.wait_for(_relay(ws, up), grant.expires - time.time())
        except asyncio.TimeoutError:
            with contextlib.suppress(Exception):
                await ws.close(code=4001, reason="the live view's link expired")
        finally:
            if mode == "control":
                _control(ws).give(sid, ws)
    finally:
        link_slots.give(sid)


def mount_novnc(app) -> None:
    """noVNC's own files, from its Debian package (public code: no token needed)."""
    if NOVNC_DIR.is_dir():
        app.mount("/v1/novnc", StaticFiles(directory=NOVNC_DIR), name="novnc")


VIEW_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>e2a desktop {{SANDBOX}}</title>
<style>
  html, body { margin: 0; height: 100%; background: #1e1e1e; color: #ddd;
               font: 14px system-ui, sans-serif; }
  #bar { height: 36px; display: flex; align-items: center; gap: 12px; padding: 0 12px; }
  #screen { height: calc(100% - 36px); }
  button { font: inherit; }
</style></head>
<body>
<div id="bar"><strong>{{SANDBOX}}</strong> <span id="status">connecting…</span>
  <button id="take" hidden>Take control</button>
  <button id="give" hidden>Hand back</button></div>
<div id="screen"></div>
<script type="module">
// noVNC is some twenty modules: one that fails to load (a network change on the viewer's side)
// would leave the page dead, so the page loads them again.
let RFB;
try {
  RFB = (await import("/v1/novnc/core/rfb.js")).default;
} catch (e) {
  document.getElementById("status").textContent = "loading again…";
  setTimeout(() => location.reload(), 1000);
  throw e;
}
const config = {{CONFIG}};
const canControl = config.control !== null;
const screen = document.getElementById("screen");
const status = document.getElementById("status");
const take = document.getElementById("take"), give = document.getElementById("give");
let rfb = null;
function connect(mode) {
  if (rfb) { rfb._e2aClosing = true; rfb.disconnect(); }
  const url = new URL("vnc?mode=" + mode, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  rfb = new RFB(screen, url.href, {credentials: {password: config[mode]}});
  rfb.viewOnly = mode === "view";
  rfb.scaleViewport = true;
  rfb.focusOnClick = true;
  const me = rfb;
  rfb.addEventListener("connect", () => {
    status.textContent = mode === "view" ? "watching" : "you control the desktop";
    document.body.dataset.mode = mode;
    take.hidden = !(canControl && mode === "view");
    give.hidden = mode !== "control";
    if (mode === "control") rfb.focus();
  });
  rfb.addEventListener("disconnect", (e) => {
    if (me._e2aClosing) return;
    document.body.dataset.mode = "disconnected";
    // a dropped view comes back by itself (a server restart, a busy host); a refused or
    // expired link does not (its retries fail at once, and stop after a few)
    if (retries < 10) {
      retries += 1;
      status.textContent = "reconnecting…";
      setTimeout(() => connect(mode === "control" ? "view" : mode), 1000 * retries);
    } else {
      status.textContent = "disconnected";
    }
  });
  rfb.addEventListener("connect", () => { retries = 0; });
}
let retries = 0;
take.onclick = () => connect("control");
give.onclick = () => connect("view");
connect("view");
</script>
</body></html>
"""
