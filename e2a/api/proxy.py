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
import logging
import re
from typing import AsyncIterator
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse

from e2a.api.deps import caller_from_header, current_user, host, owned_sandbox, running_sandbox
from e2a.api.errors import ApiError, deny_websocket
from e2a.api.schemas import (CommandRequest, MkdirRequest, RenameRequest, SignalRequest,
                             StdinRequest)
from e2a.auth import Caller
from e2a.runtime.runsc import ENVD_PORT
from e2a.sandboxes.host import (PAUSED, NotRunning, SandboxHost, TooManyConnections, Unreachable,
                                Upstream)

log = logging.getLogger(__name__)

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
UserParam = Query(default=None, max_length=32, description="the user the operation acts as "
                  "(default `user`); it can do exactly what that user can")


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
    except TooManyConnections as exc:
        raise ApiError(429, "too_many_connections", str(exc)) from exc
    except Unreachable as exc:
        raise ApiError(status, code, f"{message}: {exc}", field) from exc


class ClientGone(Exception):
    """The client went away before the sandbox answered."""


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, opening) -> Upstream:
    """Wait for the sandbox's answer, but stop waiting (and close the connection into the
    sandbox) as soon as the client disconnects: an answer that never comes (a FIFO, an app that
    accepts and never answers) must not hold the server's connection or the sandbox's idle
    clock. Only for requests whose body is already read (else the body stream is the receiver)."""
    attempt = asyncio.ensure_future(opening)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({attempt, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not attempt.done():
        attempt.cancel()
        with contextlib.suppress(BaseException):
            up = await attempt
            up.close()
        raise ClientGone()
    return attempt.result()


def _ended_event(up: Upstream, exc: BaseException | None) -> bytes:
    if up.ended == PAUSED:
        event = {"type": "error", "code": "sandbox_paused", "reason": PAUSED,
                 "message": "the sandbox was paused; the command is paused with it: after a "
                            "resume, reconnect with GET /commands/{pid}"}
    elif up.ended is not None:
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
        try:
            async for chunk in up.response.content.iter_any():
                yield chunk
                last = (last + chunk)[-4096:]
        except Exception as exc:  # not a cancellation: the client leaving ends it all
            failure = exc
        lines = last.rstrip(b"\n").rsplit(b"\n", 1)
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


async def forward(request: Request, sandboxes: SandboxHost, vm_id: str, method: str, path: str,
                  *, params: dict | None = None, json: object = None,
                  content: AsyncIterator[bytes] | None = None,
                  content_type: str | None = None) -> Response:
    """Send one request to envd and stream its answer back unchanged."""
    headers = {"Content-Type": content_type} if content_type else {}
    async with _opened((502, "sandbox_unreachable", "the sandbox's agent did not answer", None)):
        opening = sandboxes.agent_request(vm_id, method, path, params=params, json=json,
                                          data=content, headers=headers)
        if content is not None:
            up = await opening
        else:
            try:
                up = await _unless_client_leaves(request, opening)
            except ClientGone:
                return Response(status_code=499)  # nobody is there to read it
    keep = {k: v for k, v in up.response.headers.items()
            if k.lower() in ("content-type", "content-length", "content-disposition")}
    return _respond(up, keep)


def _clean(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None}


# ---- commands -------------------------------------------------------------------------------

@router.post("/commands", summary="Run a command: streams NDJSON events, or returns a pid",
             responses={200: {"content": {NDJSON: {}}}, 400: {}, 404: {}, 409: {}})
async def run_command(request: Request, req: CommandRequest, vm_id: str = Depends(live_sandbox),
                      sandboxes: SandboxHost = Depends(host)) -> Response:
    if (req.cmd is None) == (req.argv is None):
        raise ApiError(400, "invalid_command", "give exactly one of cmd or argv", "cmd")
    for key in req.env:
        if key.upper().startswith("E2A_"):
            raise ApiError(400, "reserved_env_var", f"{key} is reserved", f"env.{key}")
    if "\x00" in (req.cmd or "") or any("\x00" in a for a in req.argv or ()):
        raise ApiError(400, "invalid_command", "the command contains a NUL byte", "cmd")
    return await forward(request, sandboxes, vm_id, "POST", "/commands",
                         json=req.model_dump(exclude_none=True))


@router.get("/commands", summary="List running commands")
async def list_commands(request: Request, vm_id: str = Depends(live_sandbox),
                        sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "GET", "/commands")


@router.get("/commands/{pid}", summary="Reconnect to a command's output (NDJSON)",
            responses={200: {"content": {NDJSON: {}}}, 404: {}})
async def reconnect(request: Request, pid: int = Path(ge=1, le=2**31),
                    vm_id: str = Depends(live_sandbox),
                    sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "GET", f"/commands/{pid}")


@router.post("/commands/{pid}/stdin", status_code=204, responses={404: {}, 409: {}})
async def send_stdin(request: Request, req: StdinRequest, pid: int = Path(ge=1, le=2**31),
                     vm_id: str = Depends(live_sandbox),
                     sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "POST", f"/commands/{pid}/stdin",
                         json=req.model_dump())


@router.post("/commands/{pid}/signal", status_code=204, responses={400: {}, 404: {}})
async def send_signal(request: Request, req: SignalRequest, pid: int = Path(ge=1, le=2**31),
                      vm_id: str = Depends(live_sandbox),
                      sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "POST", f"/commands/{pid}/signal",
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
async def read_file(request: Request, path: str = PathParam, user: str | None = UserParam,
                    vm_id: str = Depends(live_sandbox),
                    sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "GET", "/files",
                         params=_clean({"path": _no_nul(path), "user": user}))


@router.put("/files", summary="Write a file (streamed; parents are created)",
            openapi_extra={"requestBody": {"content": OCTET, "required": True}},
            responses={400: {}, 404: {}})
async def write_file(request: Request, path: str = PathParam,
                     mode: str | None = Query(default=None, pattern=r"^0?[0-7]{3,4}$"),
                     user: str | None = UserParam,
                     vm_id: str = Depends(live_sandbox),
                     sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "PUT", "/files",
                         params=_clean({"path": _no_nul(path), "mode": mode, "user": user}),
                         content=request.stream(), content_type="application/octet-stream")


@router.delete("/files", status_code=204, summary="Remove a file or directory",
               responses={400: {}, 404: {}, 409: {}})
async def remove_file(request: Request, path: str = PathParam, recursive: bool = False,
                      user: str | None = UserParam,
                      vm_id: str = Depends(live_sandbox),
                      sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "DELETE", "/files",
                         params=_clean({"path": _no_nul(path), "recursive": str(recursive).lower(),
                                        "user": user}))


@router.get("/files/list", summary="List a directory", responses={400: {}, 404: {}})
async def list_dir(request: Request, path: str = PathParam,
                   user: str | None = UserParam,
                   vm_id: str = Depends(live_sandbox),
                   sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "GET", "/files/list",
                         params=_clean({"path": _no_nul(path), "user": user}))


@router.get("/files/stat", summary="Stat a path", responses={400: {}, 404: {}})
async def stat(request: Request, path: str = PathParam,
               user: str | None = UserParam,
               vm_id: str = Depends(live_sandbox),
               sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "GET", "/files/stat",
                         params=_clean({"path": _no_nul(path), "user": user}))


@router.post("/files/mkdir", summary="Make a directory", responses={400: {}, 409: {}})
async def mkdir(request: Request, req: MkdirRequest, vm_id: str = Depends(live_sandbox),
                sandboxes: SandboxHost = Depends(host)) -> Response:
    _no_nul(req.path)
    return await forward(request, sandboxes, vm_id, "POST", "/files/mkdir",
                         json=req.model_dump(exclude_none=True))


@router.post("/files/rename", summary="Rename or move a path", responses={400: {}, 404: {}})
async def rename(request: Request, req: RenameRequest, vm_id: str = Depends(live_sandbox),
                 sandboxes: SandboxHost = Depends(host)) -> Response:
    _no_nul(req.from_), _no_nul(req.to)
    return await forward(request, sandboxes, vm_id, "POST", "/files/rename",
                         json=req.model_dump(by_alias=True, exclude_none=True))


@router.get("/files/tar", summary="Download a directory as a tar (streamed)",
            responses={200: {"content": TAR}, 400: {}, 404: {}})
async def download_tar(request: Request, path: str = PathParam,
                       user: str | None = UserParam,
                       vm_id: str = Depends(live_sandbox),
                       sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "GET", "/files/tar",
                         params=_clean({"path": _no_nul(path), "user": user}))


@router.put("/files/tar", summary="Upload a tar and unpack it into a directory",
            openapi_extra={"requestBody": {"content": TAR, "required": True}},
            responses={400: {}, 404: {}})
async def upload_tar(request: Request, path: str = PathParam,
                     user: str | None = UserParam,
                     vm_id: str = Depends(live_sandbox),
                     sandboxes: SandboxHost = Depends(host)) -> Response:
    return await forward(request, sandboxes, vm_id, "PUT", "/files/tar",
                         params=_clean({"path": _no_nul(path), "user": user}),
                         content=request.stream(), content_type="application/x-tar")


# ---- port proxy -----------------------------------------------------------------------------

def _port(port: int) -> int:
    if port == ENVD_PORT:
        raise ApiError(400, "invalid_port", f"port {ENVD_PORT} is reserved for e2a's agent",
                       "port")
    return port


class Slots:
    """Concurrent uses of something per key (a user's proxied connections, a sandbox's link
    connections, a user's renders): one more than the limit is refused with 429, so one
    tenant cannot hold all of the server's descriptors or memory."""

    def __init__(self, limit: int, what: str, code: str = "too_many_connections"):
        self.limit, self.what, self.code, self.open = limit, what, code, {}

    def take(self, key: str) -> None:
        if self.open.get(key, 0) >= self.limit:
            raise ApiError(429, self.code, f"at most {self.limit} {self.what}")
        self.open[key] = self.open.get(key, 0) + 1

    def give(self, key: str) -> None:
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)

    @contextlib.contextmanager
    def held(self, key: str):
        self.take(key)
        try:
            yield
        finally:
            self.give(key)


MAX_PROXIED_PER_USER = 256
proxy_slots = Slots(MAX_PROXIED_PER_USER, "proxied connections may be open at once per user")


def _scoped_cookie(value: str, prefix: str) -> str:
    """An app's Set-Cookie, confined to its own proxy path: its Domain is dropped and its Path
    put under /v1/sandboxes/{id}/ports/{port}, so the browser sends it to this app only, never
    to the API or to another sandbox's app."""
    parts = [p.strip() for p in value.split(";")]
    kept, path = [parts[0]], "/"
    for attr in parts[1:]:
        name = attr.split("=", 1)[0].strip().lower()
        if name == "path":
            path = attr.split("=", 1)[1].strip() if "=" in attr else "/"
        elif name != "domain":
            kept.append(attr)
    kept.append(f"Path={prefix}{path if path.startswith('/') else '/' + path}")
    return "; ".join(kept)


async def port_proxy(request: Request, path: str, port: int = Path(ge=1, le=65535),
                     vm_id: str = Depends(live_sandbox), user: Caller = Depends(current_user),
                     sandboxes: SandboxHost = Depends(host)) -> Response:
    _port(port)
    # The caller's API key stays here: the sandbox gets the request without it.
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    has_body = request.method not in ("GET", "HEAD", "OPTIONS")
    target = f"/{path}" + (f"?{request.url.query}" if request.url.query else "")
    proxy_slots.take(user.id)
    try:
        async with _opened((502, "port_unreachable", f"nothing answered on port {port} in the "
                            "sandbox", "port")):
            opening = sandboxes.port_request(
                vm_id, port, request.method, target, headers=headers,
                data=request.stream() if has_body else None, allow_redirects=False)
            if has_body:
                up = await opening
            else:
                try:
                    up = await _unless_client_leaves(request, opening)
                except ClientGone:
                    proxy_slots.give(user.id)
                    return Response(status_code=499)
    except BaseException:
        proxy_slots.give(user.id)
        raise
    resp = up.response
    if resp.status == 101:  # an upgrade nobody asked for (WebSockets have their own route)
        up.close()
        proxy_slots.give(user.id)
        raise ApiError(502, "port_bad_answer", f"the app on port {port} answered 101 Switching "
                       "Protocols to a plain request", "port")

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in _relay_bytes(up):
                yield chunk
        finally:
            proxy_slots.give(user.id)

    out = StreamingResponse(body(), status_code=resp.status)
    prefix = f"/v1/sandboxes/{vm_id}/ports/{port}"
    # Raw headers, so that several Set-Cookie headers stay several.
    for name, value in resp.raw_headers:
        key = name.decode("latin-1").lower()
        if key in HOP_HEADERS:
            continue
        if key == "set-cookie":
            value = _scoped_cookie(value.decode("latin-1"), prefix).encode("latin-1")
        out.raw_headers.append((name.lower(), value))
    return out


for _method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
    router.add_api_route("/ports/{port}/{path:path}", port_proxy, methods=[_method],
                         name=f"port_proxy_{_method.lower()}",
                         summary="HTTP to a port inside the sandbox", responses={400: {}, 502: {}})


# ---- WebSockets: PTY and port proxy ---------------------------------------------------------

async def _ws_sandbox(ws: WebSocket, vm_id: str) -> tuple[Caller, str] | None:
    """Authenticate a WebSocket and find the caller's running sandbox; on failure, deny it
    (401 / 404 / 409 with the JSON error) and return None."""
    try:
        user = await caller_from_header(ws.app, ws.headers.get("authorization"))
        return user, await running_sandbox(ws.app, user, vm_id)
    except ApiError as exc:
        await deny_websocket(ws, exc)
        return None


async def _ws_open(ws: WebSocket, opening, what: str) -> Upstream | None:
    try:
        async with _opened((502, f"{what}_unreachable", f"the sandbox's {what} did not answer",
                            None)):
            return await opening
    except ApiError as exc:
        await deny_websocket(ws, exc)
    return None


def _pty_query(ws: WebSocket) -> str:
    """The PTY's parameters, checked here so a bad one is a 400 naming it, not a failed dial."""
    params = {}
    for name in ("cols", "rows"):
        value = ws.query_params.get(name)
        if value is not None:
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise ApiError(400, "invalid_field", f"{name} must be a whole number from 1 to "
                               "1000", name)
            params[name] = value
    user = ws.query_params.get("user")
    if user is not None:
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
            raise ApiError(400, "invalid_user", f"{user[:40]!r} is not a user name", "user")
        params["user"] = user
    cwd = ws.query_params.get("cwd")
    if cwd is not None:
        if not cwd or len(cwd) > 4096 or "\x00" in cwd:
            raise ApiError(400, "invalid_field", "cwd must be a path of 1 to 4096 characters",
                           "cwd")
        params["cwd"] = cwd
    return urlencode(params)


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
        errors = []
        for t in done:
            try:
                t.result()
            except Exception as exc:  # a side that broke rather than closed
                errors.append(type(exc).__name__)
        # One line per relay's end: which side ended it and how, to tell a sandbox that
        # closed from a connection that broke (the sandbox and the client are named by id
        # and close code only).
        log.info("relay %s ended by %s: upstream close %s %r%s", up.sandbox_id,
                 "the sandbox" if downward in done else "the client",
                 getattr(upstream, "close_code", None),
                 (getattr(upstream, "close_reason", None) or "")[:80],
                 f", {', '.join(errors)}" if errors else "")
        if downward in done and upward not in done:  # the sandbox's side ended: say why
            await up.settle()
        if up.ended == PAUSED:
            with contextlib.suppress(Exception):
                await client.send_text(json.dumps({
                    "type": "error", "code": "sandbox_paused", "reason": PAUSED,
                    "message": "the sandbox was paused"}))
            with contextlib.suppress(Exception):
                await client.close(code=1012, reason="sandbox paused")
        elif up.ended is not None:
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
    found = await _ws_sandbox(ws, vm_id)
    if found is None:
        return
    _, sid = found
    try:
        query = _pty_query(ws)
    except ApiError as exc:
        return await deny_websocket(ws, exc)
    up = await _ws_open(ws, ws.app.state.host.agent_websocket(
        sid, "/pty" + (f"?{query}" if query else "")), "agent")
    if up is None:
        return
    await ws.accept()
    await _relay(ws, up)


@router.websocket("/ports/{port}/{path:path}")
async def port_ws(ws: WebSocket, vm_id: str, port: str, path: str) -> None:
    found = await _ws_sandbox(ws, vm_id)
    if found is None:
        return
    user, sid = found
    if not port.isdigit() or not 1 <= int(port) <= 65535 or int(port) == ENVD_PORT:
        return await deny_websocket(ws, ApiError(400, "invalid_port", f"port must be 1-65535 and not "
                                        f"{ENVD_PORT} (e2a's agent)", "port"))
    try:
        proxy_slots.take(user.id)
    except ApiError as exc:
        return await deny_websocket(ws, exc)
    try:
        query = ws.url.query
        up = await _ws_open(ws, ws.app.state.host.port_websocket(
            sid, int(port), f"/{path}" + (f"?{query}" if query else "")), "port")
        if up is None:
            return
        await ws.accept()
        await _relay(ws, up)
    finally:
        proxy_slots.give(user.id)
