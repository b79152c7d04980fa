"""The canvas template: a live HTML canvas in /home/user/canvas that an agent draws on and a
person watches, and renders of it.

The view page (`/v1/canvas/{token}/`) shows the canvas in an iframe and reloads it when a file
changes (envd's /canvas/changes long poll). The canvas's files are served with
`Content-Security-Policy: sandbox allow-scripts`: the agent's HTML runs in an opaque origin,
never as e2a's own. Renders run in the sandbox's own Chromium (over CDP through envd), so the
HTML never runs outside a sandbox.
"""

from __future__ import annotations

import asyncio
import posixpath
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from e2a.api.access import Grant
from e2a.api.cdp import Cdp, CdpError, render
from e2a.api.endpoints import (base_url, browser_ws_path, granted, link_slots, sandbox_with,
                               tokens)
from e2a.api.deps import current_user
from e2a.api.errors import ApiError
from e2a.api.proxy import ClientGone, Slots, _opened, _respond, _unless_client_leaves
from e2a.api.schemas import CanvasOut, RenderRequest

router = APIRouter(tags=["canvas"])

CANVAS_DIR = "/home/user/canvas"
CONTENT_POLICY = "sandbox allow-scripts allow-forms allow-popups"
RENDER_TIMEOUT = 60.0
RENDERS_PER_USER = 2  # each holds up to one large CDP message in the server
render_slots = Slots(RENDERS_PER_USER, "renders at once", "too_many_renders")


@router.get("/v1/sandboxes/{vm_id}/canvas", response_model=CanvasOut,
            responses={401: {}, 404: {}, 409: {}})
async def canvas(request: Request, vm_id: str) -> CanvasOut:
    """The view page's URL; its token is this sandbox's alone and lasts as long as it."""
    sid, _ = await sandbox_with(request, vm_id, "canvas", "a canvas")
    token = tokens(request).issue(Grant(sid, "canvas", 0))
    return CanvasOut(view_url=f"{base_url(request)}/v1/canvas/{token}/")


def _canvas_path(path: str | None) -> str:
    rel = posixpath.normpath(path or "index.html").lstrip("/")
    if "\x00" in rel or rel.startswith(".."):
        raise ApiError(400, "invalid_path", "path must stay inside /home/user/canvas", "path")
    return rel


@router.post("/v1/sandboxes/{vm_id}/canvas/render", responses={
    200: {"content": {"image/png": {}, "application/pdf": {}}}, 400: {}, 404: {}, 409: {}})
async def render_canvas(request: Request, vm_id: str, req: RenderRequest) -> Response:
    """Render a canvas file (`path`, default index.html) or an HTML string (`html`, its
    relative links resolved in the canvas directory) to PNG or PDF, `width`×`height` CSS
    pixels, `wait_ms` after its load event."""
    if req.path is not None and req.html is not None:
        raise ApiError(400, "invalid_field", "give path or html, not both", "html")
    sid, port = await sandbox_with(request, vm_id, "canvas", "a canvas")
    with render_slots.held((await current_user(request)).id):
        return await _render(request, sid, port, req)


async def _render(request: Request, sid: str, port: int, req: RenderRequest) -> Response:
    host = request.app.state.host
    url = "file://" + quote(f"{CANVAS_DIR}/{_canvas_path(req.path)}") if req.html is None \
        else f"file://{CANVAS_DIR}/"
    async with _opened((502, "browser_unreachable", "the sandbox's Chromium did not answer",
                        None)):
        if req.html is not None:  # the string's base URL is the canvas, which may not exist yet
            up = await host.agent_request(sid, "POST", "/files/mkdir", json={
                "path": CANVAS_DIR, "parents": True, "user": "user"})
            try:
                await up.response.read()  # a failure shows in the render's own error
            finally:
                up.close()
        path = await browser_ws_path(host, sid, port)
        up = await host.agent_websocket(sid, f"/proxy/{port}{path}",
                                        max_size=_largest_answer(req))
    cdp = Cdp(up.conn)
    try:
        data = await _bounded(render(cdp, url, req.html, req.width, req.height, req.format,
                                     req.wait_ms))
    except CdpError as exc:
        raise ApiError(422, "render_failed", str(exc)) from exc
    finally:
        cdp.close()
        up.close()
        await up.conn.close()
    media = "application/pdf" if req.format == "pdf" else "image/png"
    return Response(data, media_type=media)


def _largest_answer(req: RenderRequest) -> int:
    """The largest CDP message a render may receive (its image, base64): bounded by the page's
    size, since what answers may be the sandbox's own code rather than Chromium."""
    if req.format == "pdf":
        return 32 << 20
    return min(64 << 20, req.width * req.height * 4 * 4 // 3 + (1 << 20))


async def _bounded(coro):
    try:
        return await asyncio.wait_for(coro, RENDER_TIMEOUT)
    except asyncio.TimeoutError:
        raise ApiError(504, "render_timeout", f"the page did not render within "
                       f"{RENDER_TIMEOUT:.0f} s") from None


# ---- the view page and what it loads --------------------------------------------------------

@router.get("/v1/canvas/{token}/", response_class=HTMLResponse, responses={401: {}, 404: {}})
async def view_page(request: Request, token: str) -> HTMLResponse:
    await granted(request, token, "canvas", "canvas")
    return HTMLResponse(VIEW_PAGE, headers={"Cache-Control": "no-store",
                                            "Referrer-Policy": "no-referrer"})


@router.get("/v1/canvas/{token}/files/{path:path}", responses={401: {}, 404: {}})
async def canvas_file(request: Request, token: str, path: str) -> Response:
    grant, _ = await granted(request, token, "canvas", "canvas")
    rel = _canvas_path(path)
    link_slots.take(grant.sandbox_id)  # while the answer is opened; files are small
    try:
        async with _opened((502, "sandbox_unreachable", "the sandbox's agent did not answer",
                            None)):
            up = await request.app.state.host.agent_request(
                grant.sandbox_id, "GET", "/canvas/files/" + quote(rel))
    finally:
        link_slots.give(grant.sandbox_id)
    headers = {k: v for k, v in up.response.headers.items()
               if k.lower() in ("content-type", "content-length")}
    headers.update({"Content-Security-Policy": CONTENT_POLICY, "Cache-Control": "no-store",
                    "X-Content-Type-Options": "nosniff"})
    return _respond(up, headers)


@router.get("/v1/canvas/{token}/changes", responses={401: {}, 404: {}})
async def changes(request: Request, token: str,
                  since: int | None = Query(default=None, ge=0),
                  timeout_ms: int = Query(default=25_000, ge=0, le=60_000)) -> Response:
    """Long poll: answers {"version"} as soon as the canvas differs from version `since`.
    A viewer that leaves stops the poll at once."""
    grant, _ = await granted(request, token, "canvas", "canvas")
    params = {"timeout_ms": timeout_ms, **({"since": since} if since is not None else {})}
    link_slots.take(grant.sandbox_id)
    try:
        async with _opened((502, "sandbox_unreachable", "the sandbox's agent did not answer",
                            None)):
            try:
                up = await _unless_client_leaves(request, request.app.state.host.agent_request(
                    grant.sandbox_id, "GET", "/canvas/changes", params=params))
            except ClientGone:
                return Response(status_code=499)
        try:
            body = await up.response.content.read(4096)
            status = up.response.status
        finally:
            up.close()
    finally:
        link_slots.give(grant.sandbox_id)
    return Response(body, status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


VIEW_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>e2a canvas</title>
<style>
  html, body { margin: 0; height: 100%; }
  iframe { border: 0; width: 100%; height: 100%; display: block; }
</style></head>
<body data-reloads="0">
<iframe id="canvas" sandbox="allow-scripts allow-forms allow-popups" src="files/index.html">
</iframe>
<script>
// Reload the canvas whenever a file under /home/user/canvas changes.
const frame = document.getElementById("canvas");
let version = null;
async function watch() {
  for (;;) {
    try {
      const r = await fetch("changes" + (version === null ? "" : "?since=" + version));
      if (r.status === 401 || r.status === 404) return;  // the sandbox is gone
      const v = (await r.json()).version;
      if (version !== null && v !== version) {
        frame.src = "files/index.html?v=" + v;
        document.body.dataset.reloads = String(Number(document.body.dataset.reloads) + 1);
      }
      version = v;
    } catch (e) {
      await new Promise(done => setTimeout(done, 1000));
    }
  }
}
watch();
</script>
</body></html>
"""
