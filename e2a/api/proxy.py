"""Routes served by the in-sandbox agent (commands, files, logs, PTY) and the port proxy.

The API checks the caller and the body, then streams the request to envd over the sandbox's own
link and streams the answer back: neither side is buffered whole, so a 1 GiB file passes through
in small chunks. While a stream is open the sandbox counts as in use (no idle reaping).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator
from urllib.parse import urlencode

import aiohttp
import websockets
from fastapi import APIRouter, Depends, Path, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession
from yarl import URL

from e2a.api.deps import (caller_from_header, current_user, db_session, manager, owned_sandbox,
                          running_sandbox)
from e2a.api.errors import ApiError
from e2a.api.schemas import (CommandRequest, MkdirRequest, RenameRequest, SignalRequest,
                             StdinRequest)
from e2a.auth import Caller
from e2a.runtime.runsc import ENVD_PORT
from e2a.sandboxes import envd
from e2a.sandboxes.manager import Live, Manager

router = APIRouter(prefix="/v1/sandboxes/{vm_id}", tags=["inside a sandbox"])

# Headers that describe one hop, not the message, and the caller's e2a API key: never forwarded.
# (Cookies do pass: they belong to the app in the sandbox, e2a itself uses none.)
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "host", "content-length",
               "authorization"}
OCTET = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
TAR = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
PathParam = Query(min_length=1, max_length=4096, description="absolute, or relative to the "
                  "user's home")


async def live_sandbox(request: Request, vm_id: str,
                       user: Caller = Depends(current_user)) -> Live:
    return await running_sandbox(request.app, user, vm_id)


async def _stream_body(resp: aiohttp.ClientResponse, live: Live) -> AsyncIterator[bytes]:
    live.streams += 1
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    finally:
        live.streams -= 1
        live.touch()
        resp.release()


async def _open(mgr: Manager, live: Live, method: str, url, unreachable: ApiError,
                **kwargs) -> aiohttp.ClientResponse:
    """Send a request into the sandbox and return the answer unread (to be streamed back).
    The sandbox counts as in use meanwhile; if nothing answers, `unreachable` is raised."""
    live.streams += 1
    try:
        return await mgr.http.request(method, url, **kwargs)
    except envd.TRANSPORT_ERRORS as exc:
        raise ApiError(unreachable.status, unreachable.code,
                       f"{unreachable.message}: {exc.__class__.__name__}",
                       unreachable.field) from exc
    finally:
        live.streams -= 1


async def forward(mgr: Manager, live: Live, method: str, path: str, *,
                  params: dict | None = None, json: object = None,
                  content: AsyncIterator[bytes] | None = None,
                  content_type: str | None = None) -> Response:
    """Send one request to envd and stream its answer back unchanged."""
    headers = envd.headers(live.token)
    if content_type:
        headers["Content-Type"] = content_type
    resp = await _open(mgr, live, method, live.envd_url + path,
                       ApiError(502, "sandbox_unreachable", "the sandbox's agent did not answer"),
                       params=params, json=json, data=content, headers=headers)
    keep = {k: v for k, v in resp.headers.items()
            if k.lower() in ("content-type", "content-length", "content-disposition")}
    if resp.status == 204:
        resp.release()
        return Response(status_code=204)
    return StreamingResponse(_stream_body(resp, live), status_code=resp.status, headers=keep)


def _clean(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None}


# ---- commands -------------------------------------------------------------------------------

@router.post("/commands", summary="Run a command: streams NDJSON events, or returns a pid",
             responses={200: {"content": {"application/x-ndjson": {}}}, 400: {}, 404: {}, 409: {}})
async def run_command(req: CommandRequest, live: Live = Depends(live_sandbox),
                      mgr: Manager = Depends(manager)) -> Response:
    if (req.cmd is None) == (req.argv is None):
        raise ApiError(400, "invalid_command", "give exactly one of cmd or argv", "cmd")
    for key in req.env:
        if key.upper().startswith("E2A_"):
            raise ApiError(400, "reserved_env_var", f"{key} is reserved", f"env.{key}")
    if "\x00" in (req.cmd or "") or any("\x00" in a for a in req.argv or ()):
        raise ApiError(400, "invalid_command", "the command contains a NUL byte", "cmd")
    return await forward(mgr, live, "POST", "/commands", json=req.model_dump(exclude_none=True))


@router.get("/commands", summary="List running commands")
async def list_commands(live: Live = Depends(live_sandbox),
                        mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "GET", "/commands")


@router.get("/commands/{pid}", summary="Reconnect to a command's output (NDJSON)",
            responses={200: {"content": {"application/x-ndjson": {}}}, 404: {}})
async def reconnect(pid: int = Path(ge=1, le=2**31), live: Live = Depends(live_sandbox),
                    mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "GET", f"/commands/{pid}")


@router.post("/commands/{pid}/stdin", status_code=204, responses={404: {}, 409: {}})
async def send_stdin(req: StdinRequest, pid: int = Path(ge=1, le=2**31),
                     live: Live = Depends(live_sandbox), mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "POST", f"/commands/{pid}/stdin", json=req.model_dump())


@router.post("/commands/{pid}/signal", status_code=204, responses={400: {}, 404: {}})
async def send_signal(req: SignalRequest, pid: int = Path(ge=1, le=2**31),
                      live: Live = Depends(live_sandbox), mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "POST", f"/commands/{pid}/signal", json=req.model_dump())


# ---- logs -----------------------------------------------------------------------------------

@router.get("/logs", summary="The sandbox's log: the host's lines and the agent's, by time")
async def logs(vm_id: str, user: Caller = Depends(current_user),
               db: AsyncSession = Depends(db_session),
               mgr: Manager = Depends(manager)) -> JSONResponse:
    row = await owned_sandbox(db, user, vm_id)
    lines = mgr.hostlog.read(row.id)
    live = mgr.live.get(row.id)
    if live is not None and not live.destroying:
        live.touch()
        data = await envd.get_json(mgr.http, live.envd_url + "/logs", live.token)
        lines += (data or {}).get("lines", [])
    lines.sort(key=lambda line: line.get("ts", ""))
    return JSONResponse({"lines": lines})


# ---- files ----------------------------------------------------------------------------------

def _no_nul(path: str) -> str:
    if "\x00" in path:
        raise ApiError(400, "invalid_path", "the path contains a NUL byte", "path")
    return path


@router.get("/files", summary="Read a file (streamed)",
            responses={200: {"content": OCTET}, 400: {}, 404: {}})
async def read_file(path: str = PathParam, user: str | None = Query(default=None, max_length=32),
                    live: Live = Depends(live_sandbox), mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "GET", "/files",
                         params=_clean({"path": _no_nul(path), "user": user}))


@router.put("/files", summary="Write a file (streamed; parents are created)",
            openapi_extra={"requestBody": {"content": OCTET, "required": True}},
            responses={400: {}, 404: {}})
async def write_file(request: Request, path: str = PathParam,
                     mode: str | None = Query(default=None, pattern=r"^0?[0-7]{3,4}$"),
                     user: str | None = Query(default=None, max_length=32),
                     live: Live = Depends(live_sandbox), mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "PUT", "/files",
                         params=_clean({"path": _no_nul(path), "mode": mode, "user": user}),
                         content=request.stream(), content_type="application/octet-stream")


@router.delete("/files", status_code=204, summary="Remove a file or directory",
               responses={400: {}, 404: {}, 409: {}})
async def remove_file(path: str = PathParam, recursive: bool = False,
                      live: Live = Depends(live_sandbox), mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "DELETE", "/files",
                         params={"path": _no_nul(path), "recursive": str(recursive).lower()})


@router.get("/files/list", summary="List a directory", responses={400: {}, 404: {}})
async def list_dir(path: str = PathParam, live: Live = Depends(live_sandbox),
                   mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "GET", "/files/list", params={"path": _no_nul(path)})


@router.get("/files/stat", summary="Stat a path", responses={400: {}, 404: {}})
async def stat(path: str = PathParam, live: Live = Depends(live_sandbox),
               mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "GET", "/files/stat", params={"path": _no_nul(path)})


@router.post("/files/mkdir", summary="Make a directory", responses={400: {}, 409: {}})
async def mkdir(req: MkdirRequest, live: Live = Depends(live_sandbox),
                mgr: Manager = Depends(manager)) -> Response:
    _no_nul(req.path)
    return await forward(mgr, live, "POST", "/files/mkdir", json=req.model_dump())


@router.post("/files/rename", summary="Rename or move a path", responses={400: {}, 404: {}})
async def rename(req: RenameRequest, live: Live = Depends(live_sandbox),
                 mgr: Manager = Depends(manager)) -> Response:
    _no_nul(req.from_), _no_nul(req.to)
    return await forward(mgr, live, "POST", "/files/rename", json=req.model_dump(by_alias=True))


@router.get("/files/tar", summary="Download a directory as a tar (streamed)",
            responses={200: {"content": TAR}, 400: {}, 404: {}})
async def download_tar(path: str = PathParam, live: Live = Depends(live_sandbox),
                       mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "GET", "/files/tar", params={"path": _no_nul(path)})


@router.put("/files/tar", summary="Upload a tar and unpack it into a directory",
            openapi_extra={"requestBody": {"content": TAR, "required": True}},
            responses={400: {}, 404: {}})
async def upload_tar(request: Request, path: str = PathParam,
                     user: str | None = Query(default=None, max_length=32),
                     live: Live = Depends(live_sandbox), mgr: Manager = Depends(manager)) -> Response:
    return await forward(mgr, live, "PUT", "/files/tar",
                         params=_clean({"path": _no_nul(path), "user": user}),
                         content=request.stream(), content_type="application/x-tar")


# ---- port proxy -----------------------------------------------------------------------------

def _port(port: int) -> int:
    if port == ENVD_PORT:
        raise ApiError(400, "invalid_port", f"port {ENVD_PORT} is reserved for e2a's agent",
                       "port")
    return port


async def port_proxy(request: Request, path: str, port: int = Path(ge=1, le=65535),
                     live: Live = Depends(live_sandbox), mgr: Manager = Depends(manager)) -> Response:
    _port(port)
    # The caller's API key stays here: the sandbox gets the request without it.
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    has_body = request.method not in ("GET", "HEAD", "OPTIONS")
    url = f"http://{live.link.sandbox_ip}:{port}/{path}"
    if request.url.query:
        url += "?" + request.url.query
    resp = await _open(
        mgr, live, request.method, URL(url, encoded=True),
        ApiError(502, "port_unreachable", f"nothing answered on port {port} in the sandbox",
                 "port"),
        headers=headers, data=request.stream() if has_body else None, allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
    return StreamingResponse(_stream_body(resp, live), status_code=resp.status,
                             headers=out_headers)


for _method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
    router.add_api_route("/ports/{port}/{path:path}", port_proxy, methods=[_method],
                         name=f"port_proxy_{_method.lower()}",
                         summary="HTTP to a port inside the sandbox", responses={400: {}, 502: {}})


# ---- WebSockets: PTY and port proxy ---------------------------------------------------------

async def _ws_live(ws: WebSocket, vm_id: str) -> Live | None:
    """Authenticate a WebSocket; on failure close it with 4401 / 4404 / 4409 before accepting."""
    try:
        user = await caller_from_header(ws.app, ws.headers.get("authorization"))
        return await running_sandbox(ws.app, user, vm_id)
    except ApiError as exc:
        await ws.close(code=4000 + exc.status, reason=exc.message[:120])
        return None


async def _relay(client: WebSocket, upstream, live: Live) -> None:
    """Copy frames both ways until either side closes."""
    live.streams += 1

    async def down() -> None:
        async for msg in upstream:
            if isinstance(msg, bytes):
                await client.send_bytes(msg)
            else:
                await client.send_text(msg)

    async def up() -> None:
        while True:
            msg = await client.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                await upstream.send(msg["bytes"])
            elif msg.get("text") is not None:
                await upstream.send(msg["text"])

    try:
        tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        for t in done:
            with contextlib.suppress(Exception):
                t.result()
    finally:
        live.streams -= 1
        live.touch()
        with contextlib.suppress(Exception):
            await upstream.close()
        with contextlib.suppress(Exception):
            await client.close()


@router.websocket("/pty")
async def pty(ws: WebSocket, vm_id: str) -> None:
    live = await _ws_live(ws, vm_id)
    if live is None:
        return
    params = {k: v for k, v in ws.query_params.items() if k in ("cols", "rows", "user", "cwd")}
    query = urlencode(params)
    url = f"ws://{live.link.sandbox_ip}:{ENVD_PORT}/pty" + (f"?{query}" if query else "")
    try:
        upstream = await websockets.connect(
            url, additional_headers=envd.headers(live.token), max_size=None, open_timeout=10)
    except Exception as exc:
        await ws.close(code=1011, reason=f"agent unreachable: {exc.__class__.__name__}")
        return
    await ws.accept()
    await _relay(ws, upstream, live)


@router.websocket("/ports/{port}/{path:path}")
async def port_ws(ws: WebSocket, vm_id: str, port: int, path: str) -> None:
    live = await _ws_live(ws, vm_id)
    if live is None:
        return
    if not 1 <= port <= 65535 or port == ENVD_PORT:
        await ws.close(code=4400, reason="invalid port")
        return
    query = ws.url.query
    url = f"ws://{live.link.sandbox_ip}:{port}/{path}" + (f"?{query}" if query else "")
    try:
        upstream = await websockets.connect(url, max_size=None, open_timeout=10)
    except Exception as exc:
        await ws.close(code=1011, reason=f"port unreachable: {exc.__class__.__name__}")
        return
    await ws.accept()
    await _relay(ws, upstream, live)
