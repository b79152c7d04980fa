"""Routes served by the in-sandbox agent (commands, files, logs, PTY) and the port proxy.

The API checks the caller and the body, asks the sandbox host for a connection into the
sandbox, and streams the answer back: neither side is buffered whole, so a 1 GiB file passes
through in small chunks. While a connection is open the sandbox counts as in use (no idle
reaping). A stream that stops before its end says why: an NDJSON command stream ends with an
`exit` event or, if the sandbox died or the link broke, an `error` event; a WebSocket closes
with code 1011 and the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse

from e2a.api.deps import caller_from_header, current_user, host, owned_sandbox, running_sandbox
from e2a.api.errors import ApiError
from e2a.api.schemas import (CommandRequest, MkdirRequest, RenameRequest, SignalRequest,
                             StdinRequest)
from e2a.auth import Caller
from e2a.runtime.runsc import ENVD_PORT
from e2a.sandboxes.host import NotRunning, SandboxHost, Unreachable, Upstream

router = APIRouter(prefix="/v1/sandboxes/{vm_id}", tags=["inside a sandbox"])

# Headers that describe one hop, not the message, and the caller's e2a API key: never forwarded.
# (Cookies do pass: they belong to the app in the sandbox, e2a itself uses none.)
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "host", "content-length",
               "authorization"}
OCTET = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
TAR = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
NDJSON = "application/x-ndjson"
PathParam = Query(min_length=1, max_length=4096, description="absolute, or relative to the "
                  "user's home")


async def live_sandbox(request: Request, vm_id: str,
                       user: Caller = Depends(current_user)) -> str:
    return await running_sandbox(request.app, user, vm_id)


@contextlib.asynccontextmanager
async def _opened(unreachable: tuple[int, str, str, str | None]):
    """Turn the host's refusals into API errors: 409 not running, 502 nothing answered."""
    status, code, message, field = unreachable
    try:
        yield
    except NotRunning as exc:
        raise ApiError(409, "sandbox_not_running", str(exc), "vm_id") from exc
    except Unreachable as exc:
        raise ApiError(status, code, f"{message}: {exc}", field) from exc


def _ended_event(up: Upstream, exc: BaseException | None) -> bytes:
    if up.ended is not None:
        event = {"type": "error", "code": "sandbox_ended", "reason": up.ended.value,
                 "message": f"the sandbox ended ({up.ended.value}) before the command did"}
    else:
        what = exc.__class__.__name__ if exc else "end of stream"
        event = {"type": "error", "code": "stream_broken", "reason": None,
                 "message": f"the connection to the sandbox broke ({what}) before the command "
                            "ended; reconnect with GET /commands/{pid}"}
    return json.dumps(event).encode() + b"\n"


def _is_exit(line: bytes) -> bool:
    try:
        return json.loads(line).get("type") == "exit"
    except (ValueError, AttributeError):
        return False


async def _relay_ndjson(up: Upstream) -> AsyncIterator[bytes]:
    """Pass an NDJSON stream through; if it stops without its `exit` event, add an `error`
    event saying why, so a client never waits on a stream that will not end."""
    last = b""
    failure: BaseException | None = None
    try:
        async for chunk in up.response.content.iter_any():
            yield chunk
            last = (last + chunk)[-4096:]
    except Exception as exc:
        failure = exc
    lines = last.rstrip(b"\n").rsplit(b"\n", 1)
    try:
        if failure is not None or not _is_exit(lines[-1]):
            await up.settle()
            yield _ended_event(up, failure)
    finally:
        up.close()


async def _relay_bytes(up: Upstream) -> AsyncIterator[bytes]:
    """Pass a body through. If the sandbox goes mid-body the error propagates, so the server
    cuts the response short and the client sees an incomplete body, never a silent truncation."""
    try:
        async for chunk in up.response.content.iter_any():
            yield chunk
    finally:
        up.close()


def _respond(up: Upstream, headers: dict[str, str]) -> Response:
    resp = up.response
    if resp.status == 204:
        up.close()
        return Response(status_code=204)
    ndjson = resp.headers.get("content-type", "").startswith(NDJSON)
    body = _relay_ndjson(up) if ndjson else _relay_bytes(up)
    return StreamingResponse(body, status_code=resp.status, headers=headers)


async def forward(sandboxes: SandboxHost, vm_id: str, method: str, path: str, *,
                  params: dict | None = None, json: object = None,
                  content: AsyncIterator[bytes] | None = None,
                  content_type: str | None = None) -> Response:
    """Send one request to envd and stream its answer back unchanged."""
    headers = {"Content-Type": content_type} if content_type else {}
    async with _opened((502, "sandbox_unreachable", "the sandbox's agent did not answer", None)):
        up = await sandboxes.agent_request(vm_id, method, path, params=params, json=json,
                                           data=content, headers=headers)
    keep = {k: v for k, v in up.response.headers.items()
            if k.lower() in ("content-type", "content-length", "content-disposition")}
    return _respond(up, keep)


def _clean(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None}


# ---- commands -------------------------------------------------------------------------------

@router.post("/commands", summary="Run a command: streams NDJSON events, or returns a pid",
             responses={200: {"content": {NDJSON: {}}}, 400: {}, 404: {}, 409: {}})
async def run_command(req: CommandRequest, vm_id: str = Depends(live_sandbox),
                      sandboxes: SandboxHost = Depends(host)) -> Response:
    if (req.cmd is None) == (req.argv is None):
        raise ApiError(400, "invalid_command", "give exactly one of cmd or argv", "cmd")
    for key in req.env:
        if key.upper().startswith("E2A_"):
            raise ApiError(400, "reserved_env_var", f"{key} is reserved", f"env.{key}")
    if "\x00" in (req.cmd or "") or any("\x00" in a for a in req.argv or ()):
        raise ApiError(400, "invalid_command", "the command contains a NUL byte", "cmd")
    return await forward(sandboxes, vm_id, "POST", "/commands",
                         json=req.model_dump(exclude_none=True))


@router.get("/commands", summary="List running commands")
async def list_commands(vm_id: str = Depends(live_sandbox),
                        sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "GET", "/commands")


@router.get("/commands/{pid}", summary="Reconnect to a command's output (NDJSON)",
            responses={200: {"content": {NDJSON: {}}}, 404: {}})
async def reconnect(pid: int = Path(ge=1, le=2**31), vm_id: str = Depends(live_sandbox),
                    sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "GET", f"/commands/{pid}")


@router.post("/commands/{pid}/stdin", status_code=204, responses={404: {}, 409: {}})
async def send_stdin(req: StdinRequest, pid: int = Path(ge=1, le=2**31),
                     vm_id: str = Depends(live_sandbox),
                     sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "POST", f"/commands/{pid}/stdin",
                         json=req.model_dump())


@router.post("/commands/{pid}/signal", status_code=204, responses={400: {}, 404: {}})
async def send_signal(req: SignalRequest, pid: int = Path(ge=1, le=2**31),
                      vm_id: str = Depends(live_sandbox),
                      sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "POST", f"/commands/{pid}/signal",
                         json=req.model_dump())


# ---- logs -----------------------------------------------------------------------------------

@router.get("/logs", summary="The sandbox's log: the host's lines and the agent's, by time")
async def logs(request: Request, vm_id: str, user: Caller = Depends(current_user),
               sandboxes: SandboxHost = Depends(host)) -> JSONResponse:
    rec = await owned_sandbox(request.app, user, vm_id)
    return JSONResponse({"lines": await sandboxes.logs(rec.id)})


# ---- files ----------------------------------------------------------------------------------

def _no_nul(path: str) -> str:
    if "\x00" in path:
        raise ApiError(400, "invalid_path", "the path contains a NUL byte", "path")
    return path


@router.get("/files", summary="Read a file (streamed)",
            responses={200: {"content": OCTET}, 400: {}, 404: {}})
async def read_file(path: str = PathParam, user: str | None = Query(default=None, max_length=32),
                    vm_id: str = Depends(live_sandbox),
                    sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "GET", "/files",
                         params=_clean({"path": _no_nul(path), "user": user}))


@router.put("/files", summary="Write a file (streamed; parents are created)",
            openapi_extra={"requestBody": {"content": OCTET, "required": True}},
            responses={400: {}, 404: {}})
async def write_file(request: Request, path: str = PathParam,
                     mode: str | None = Query(default=None, pattern=r"^0?[0-7]{3,4}$"),
                     user: str | None = Query(default=None, max_length=32),
                     vm_id: str = Depends(live_sandbox),
                     sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "PUT", "/files",
                         params=_clean({"path": _no_nul(path), "mode": mode, "user": user}),
                         content=request.stream(), content_type="application/octet-stream")


@router.delete("/files", status_code=204, summary="Remove a file or directory",
               responses={400: {}, 404: {}, 409: {}})
async def remove_file(path: str = PathParam, recursive: bool = False,
                      vm_id: str = Depends(live_sandbox),
                      sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "DELETE", "/files",
                         params={"path": _no_nul(path), "recursive": str(recursive).lower()})


@router.get("/files/list", summary="List a directory", responses={400: {}, 404: {}})
async def list_dir(path: str = PathParam, vm_id: str = Depends(live_sandbox),
                   sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "GET", "/files/list", params={"path": _no_nul(path)})


@router.get("/files/stat", summary="Stat a path", responses={400: {}, 404: {}})
async def stat(path: str = PathParam, vm_id: str = Depends(live_sandbox),
               sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "GET", "/files/stat", params={"path": _no_nul(path)})


@router.post("/files/mkdir", summary="Make a directory", responses={400: {}, 409: {}})
async def mkdir(req: MkdirRequest, vm_id: str = Depends(live_sandbox),
                sandboxes: SandboxHost = Depends(host)) -> Response:
    _no_nul(req.path)
    return await forward(sandboxes, vm_id, "POST", "/files/mkdir", json=req.model_dump())


@router.post("/files/rename", summary="Rename or move a path", responses={400: {}, 404: {}})
async def rename(req: RenameRequest, vm_id: str = Depends(live_sandbox),
                 sandboxes: SandboxHost = Depends(host)) -> Response:
    _no_nul(req.from_), _no_nul(req.to)
    return await forward(sandboxes, vm_id, "POST", "/files/rename",
                         json=req.model_dump(by_alias=True))


@router.get("/files/tar", summary="Download a directory as a tar (streamed)",
            responses={200: {"content": TAR}, 400: {}, 404: {}})
async def download_tar(path: str = PathParam, vm_id: str = Depends(live_sandbox),
                       sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "GET", "/files/tar", params={"path": _no_nul(path)})


@router.put("/files/tar", summary="Upload a tar and unpack it into a directory",
            openapi_extra={"requestBody": {"content": TAR, "required": True}},
            responses={400: {}, 404: {}})
async def upload_tar(request: Request, path: str = PathParam,
                     user: str | None = Query(default=None, max_length=32),
                     vm_id: str = Depends(live_sandbox),
                     sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(sandboxes, vm_id, "PUT", "/files/tar",
                         params=_clean({"path": _no_nul(path), "user": user}),
                         content=request.stream(), content_type="application/x-tar")


# ---- port proxy -----------------------------------------------------------------------------

def _port(port: int) -> int:
    if port == ENVD_PORT:
        raise ApiError(400, "invalid_port", f"port {ENVD_PORT} is reserved for e2a's agent",
                       "port")
    return port


async def port_proxy(request: Request, path: str, port: int = Path(ge=1, le=65535),
                     vm_id: str = Depends(live_sandbox),
                     sandboxes: SandboxHost = Depends(host)) -> Response:
    _port(port)
    # The caller's API key stays here: the sandbox gets the request without it.
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    has_body = request.method not in ("GET", "HEAD", "OPTIONS")
    target = f"/{path}" + (f"?{request.url.query}" if request.url.query else "")
    async with _opened((502, "port_unreachable", f"nothing answered on port {port} in the "
                        "sandbox", "port")):
        up = await sandboxes.port_request(
            vm_id, port, request.method, target, headers=headers,
            data=request.stream() if has_body else None, allow_redirects=False)
    out_headers = {k: v for k, v in up.response.headers.items() if k.lower() not in HOP_HEADERS}
    return StreamingResponse(_relay_bytes(up), status_code=up.response.status,
                             headers=out_headers)


for _method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
    router.add_api_route("/ports/{port}/{path:path}", port_proxy, methods=[_method],
                         name=f"port_proxy_{_method.lower()}",
                         summary="HTTP to a port inside the sandbox", responses={400: {}, 502: {}})


# ---- WebSockets: PTY and port proxy ---------------------------------------------------------

async def _ws_sandbox(ws: WebSocket, vm_id: str) -> str | None:
    """Authenticate a WebSocket; on failure close it with 4401 / 4404 / 4409 before accepting."""
    try:
        user = await caller_from_header(ws.app, ws.headers.get("authorization"))
        return await running_sandbox(ws.app, user, vm_id)
    except ApiError as exc:
        await ws.close(code=4000 + exc.status, reason=exc.message[:120])
        return None


async def _ws_open(ws: WebSocket, opening, what: str) -> Upstream | None:
    try:
        return await opening
    except NotRunning as exc:
        await ws.close(code=4409, reason=str(exc)[:120])
    except Unreachable as exc:
        await ws.close(code=1011, reason=f"{what} unreachable: {exc}"[:120])
    return None


async def _relay(client: WebSocket, up: Upstream) -> None:
    """Copy frames both ways until either side closes. If the sandbox ended, the client gets
    a text frame {"type": "error", ...} and a close with code 1011 naming the reason."""
    upstream = up.conn

    async def down() -> None:
        async for msg in upstream:
            if isinstance(msg, bytes):
                await client.send_bytes(msg)
            else:
                await client.send_text(msg)

    async def up_() -> None:
        while True:
            msg = await client.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                await upstream.send(msg["bytes"])
            elif msg.get("text") is not None:
                await upstream.send(msg["text"])

    try:
        downward, upward = asyncio.create_task(down()), asyncio.create_task(up_())
        done, pending = await asyncio.wait({downward, upward},
                                           return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        for t in done:
            with contextlib.suppress(Exception):
                t.result()
        if downward in done and upward not in done:  # the sandbox's side ended: say why
            await up.settle()
        if up.ended is not None:
            with contextlib.suppress(Exception):
                await client.send_text(json.dumps({
                    "type": "error", "code": "sandbox_ended", "reason": up.ended.value,
                    "message": f"the sandbox ended ({up.ended.value})"}))
            with contextlib.suppress(Exception):
                await client.close(code=1011, reason=f"sandbox ended: {up.ended.value}")
    finally:
        up.close()
        with contextlib.suppress(Exception):
            await upstream.close()
        with contextlib.suppress(Exception):
            await client.close()


@router.websocket("/pty")
async def pty(ws: WebSocket, vm_id: str) -> None:
    sid = await _ws_sandbox(ws, vm_id)
    if sid is None:
        return
    params = {k: v for k, v in ws.query_params.items() if k in ("cols", "rows", "user", "cwd")}
    query = urlencode(params)
    up = await _ws_open(ws, ws.app.state.host.agent_websocket(
        sid, "/pty" + (f"?{query}" if query else "")), "agent")
    if up is None:
        return
    await ws.accept()
    await _relay(ws, up)


@router.websocket("/ports/{port}/{path:path}")
async def port_ws(ws: WebSocket, vm_id: str, port: int, path: str) -> None:
    sid = await _ws_sandbox(ws, vm_id)
    if sid is None:
        return
    if not 1 <= port <= 65535 or port == ENVD_PORT:
        await ws.close(code=4400, reason="invalid port")
        return
    query = ws.url.query
    up = await _ws_open(ws, ws.app.state.host.port_websocket(
        sid, port, f"/{path}" + (f"?{query}" if query else "")), "port")
    if up is None:
        return
    await ws.accept()
    await _relay(ws, up)
