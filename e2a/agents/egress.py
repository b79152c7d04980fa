"""The LLM egress proxy: how an agent CLI in a sandbox uses the user's key without ever holding it.

The CLI is given a placeholder key (random, per sandbox, shaped like the vendor's keys) and, as
its API base, `http://<host side of the sandbox's link>:<egress_port>/<vendor>`. This proxy
listens there (the firewall lets only sandboxes reach the port), knows each sandbox by the
address its connection comes from, and forwards the request to that vendor's API with the
placeholder replaced by the real key, in headers and the query string. Nothing else gets the
key: a request for another vendor than the sandbox's is refused, a request without the
placeholder is forwarded without any key, and the key is cut from every answer (a provider's
error message can quote it) before the sandbox sees it. Answers stream through as they come
(server-sent events), unbuffered.

The proxy calls the operator's upstream (E2A_LLM_<VENDOR>_URL) or a grant's own (a caller's API
root, checked when it was given), always through the SSRF guard (e2a/agents/ssrf.py), and follows
no redirect: a 3xx goes back to the CLI as it came.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from dataclasses import dataclass

import httpx
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from e2a.agents import ssrf

log = logging.getLogger("e2a.egress")

# Headers that describe one hop, not the request (RFC 9110 7.6.1), and the ones the proxy sets.
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
       "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"}
# The shape of each vendor's keys: some CLIs check it before they send anything.
# A sandbox's requests are streamed to the provider, never buffered whole; these bound what one
# sandbox can make the host hold open or carry (an agent sends one or a few at a time; a
# request with images is a few MiB).
MAX_BODY = 64 << 20
MAX_OPEN = 16
# Open connections per client address, idle or half-sent ones included: the proxy runs in e2a's
# process, whose file descriptors a sandbox must not use up. (The embedded backend's firewall
# caps the same; on Kubernetes a NetworkPolicy cannot count, so this is the cap there.)
MAX_CONNECTIONS = 32
KEY_SHAPES = {"anthropic": "sk-ant-api03-e2a", "openai": "sk-proj-e2a", "deepseek": "sk-e2a",
              "google": "AIzaSyE2a"}


def placeholder(vendor: str) -> str:
    return f"{KEY_SHAPES.get(vendor, 'e2a')}-{secrets.token_urlsafe(24)}-placeholder"


@dataclass
class Grant:
    """What one sandbox may do through the proxy: call `vendor` with `key`, at the vendor's
    upstream or at `upstream` (a caller's own API root, already checked by ssrf.check_url)."""

    vendor: str
    key: str
    placeholder: str
    upstream: str | None = None
    requests: int = 0
    open: int = 0                     # requests in flight

    def __repr__(self) -> str:  # never the key
        return f"Grant(vendor={self.vendor!r}, upstream={self.upstream!r})"


class Egress:
    def __init__(self, upstreams: dict[str, str], port: int, host: str = "0.0.0.0", *,
                 policy: ssrf.Policy | None = None):
        self.upstreams = upstreams          # vendor -> API root, e.g. https://api.anthropic.com
        self.port, self.host = port, host
        self.grants: dict[str, Grant] = {}  # sandbox address -> its grant
        # What the proxy may connect to: public addresses, the policy's allowed hosts (e2a
        # serve's: E2A_LLM_PRIVATE_HOSTS), and its own upstreams, allowed by construction.
        self.policy = (policy or ssrf.Policy()).allowing(*upstreams.values())
        # The pool is bounded by what sandboxes may have in flight (MAX_OPEN each), not by
        # httpx's default of 100 that a few sandboxes' slow requests could take from all others.
        self.client = ssrf.guarded_httpx_client(
            self.policy, timeout=httpx.Timeout(600, connect=15), http2=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    # ---- grants ------------------------------------------------------------------------------

    def grant(self, sandbox_ip: str, vendor: str, key: str, upstream: str | None = None) -> Grant:
        """Let the sandbox call `vendor` with `key`: at the operator's upstream for it, or at
        `upstream`, a caller's own API root (checked by ssrf.check_url before it gets here; the
        proxy's guard checks each connection again)."""
        if upstream is None and vendor not in self.upstreams:
            raise ValueError(f"no upstream for vendor {vendor!r}")
        g = Grant(vendor=vendor, key=key, placeholder=placeholder(vendor),
                  upstream=upstream.rstrip("/") if upstream else None)
        self.allow(sandbox_ip, g)
        return g

    def allow(self, sandbox_ip: str, g: Grant) -> None:
        """Honour an existing grant again (its placeholder and counts kept)."""
        self.grants[sandbox_ip] = g

    def revoke(self, sandbox_ip: str) -> None:
        self.grants.pop(sandbox_ip, None)

    def base_url(self, host_ip: str, vendor: str) -> str:
        return f"http://{host_ip}:{self.port}/{vendor}"

    # ---- serving -----------------------------------------------------------------------------

    async def start(self) -> None:
        app = Starlette(routes=[Route("/{path:path}", self._forward, methods=[
            "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])])
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                http=_capped(MAX_CONNECTIONS),
                                access_log=False, lifespan="off", proxy_headers=False,
                                server_header=False, date_header=False,
                                # a provider's answer still streaming must not hold e2a's stop
                                timeout_graceful_shutdown=1)
        # Bound here, not by uvicorn, so a taken port is an OSError and not uvicorn's exit.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections: without it an answer's small writes (headers,
        # then body) wait on the client's delayed ACK, 40 ms per request (measured).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # e2a serve handles signals
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="egress proxy")
        while not self._server.started:
            if self._task.done():
                raise OSError(f"the egress proxy did not start on port {self.port}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()

    async def _forward(self, request: Request) -> Response:
        client = request.client.host if request.client else ""
        g = self.grants.get(client)
        if g is None:
            return _refuse(403, "this sandbox holds no agent key (no agent task is running in it)")
        vendor, _, rest = request.path_params["path"].partition("/")
        if vendor != g.vendor:
            return _refuse(403, f"this sandbox's agent may call {g.vendor}, not {vendor!r}")
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return _refuse(413, f"a request to the provider may be at most {MAX_BODY} bytes")
        if g.open >= MAX_OPEN:
            return _refuse(429, f"at most {MAX_OPEN} requests of one sandbox at a time")
        headers = [(k, v.replace(g.placeholder, g.key)) for k, v in request.headers.items()
                   if k.lower() not in HOP]
        headers.append(("accept-encoding", "identity"))  # so the key can be cut from answers
        if size is not None:
            headers.append(("content-length", size))
        query = request.url.query.replace(g.placeholder, g.key)
        root = g.upstream or self.upstreams[vendor]
        url = f"{root}/{rest}" + (f"?{query}" if query else "")
        g.requests += 1
        g.open += 1
        try:
            upstream = await self.client.send(self.client.build_request(
                request.method, url, headers=headers, content=_limited(request.stream())),
                stream=True)
        except (httpx.HTTPError, BodyTooLarge) as exc:
            g.open -= 1
            if isinstance(exc, BodyTooLarge):
                return _refuse(413, f"a request to the provider may be at most {MAX_BODY} bytes")
            refused = ssrf.refusal(exc)
            if refused:
                log.warning("egress to %s refused by the SSRF guard: %s", vendor, refused)
                return _refuse(502, f"e2a did not call {vendor}'s API: {refused}")
            log.warning("egress to %s failed: %s", vendor, type(exc).__name__)
            return _refuse(502, f"{vendor}'s API could not be reached ({type(exc).__name__})")
        out_headers = {k: v.replace(g.key, g.placeholder) for k, v in upstream.headers.items()
                       if k.lower() not in HOP and k.lower() != "content-encoding"}
        return StreamingResponse(_scrubbed(upstream, g), status_code=upstream.status_code,
                                 headers=out_headers)


class BodyTooLarge(Exception):
    pass


async def _limited(chunks):
    """The request's body as it arrives (never held whole), cut off past MAX_BODY."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > MAX_BODY:
            raise BodyTooLarge()
        yield chunk


async def _scrubbed(upstream: httpx.Response, g: Grant):
    """The answer's bytes as they come, with the key replaced wherever it appears, also across
    chunk boundaries (the last len(key)-1 bytes wait for the next chunk). Ends the request's
    count in flight however it ends (the sandbox may go away mid-answer)."""
    key, mask = g.key.encode(), g.placeholder.encode()
    keep = len(key) - 1
    tail = b""
    try:
        async for chunk in upstream.aiter_raw():
            data = (tail + chunk).replace(key, mask)
            if len(data) > keep:
                out, tail = data[:len(data) - keep], data[len(data) - keep:]
                # a key that starts in `out` and ends in `tail` was already replaced above
                yield out
            else:
                tail = data
        if tail:
            yield tail
    finally:
        g.open -= 1
        await upstream.aclose()


def _refuse(status: int, message: str) -> Response:
    return JSONResponse({"error": {"type": "e2a_egress", "message": message}}, status_code=status)


def _capped(limit: int) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP/1.1 protocol (httptools, as its "auto" picks), closing at once a connection from an address that has
    `limit` open already (counted from connect to close, before any request is read)."""
    open_by_peer: dict[str, int] = {}

    class Capped(HttpToolsProtocol):
        peer: str | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            peer = (transport.get_extra_info("peername") or ("",))[0]
            if open_by_peer.get(peer, 0) >= limit:
                transport.abort()
                return
            open_by_peer[peer] = open_by_peer.get(peer, 0) + 1
            self.peer = peer
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is None:  # refused: uvicorn never saw it
                return
            open_by_peer[self.peer] -= 1
            if not open_by_peer[self.peer]:
                del open_by_peer[self.peer]
            super().connection_lost(exc)

    return Capped
