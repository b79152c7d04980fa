"""The API's connections into running sandboxes, shared by both backends (the embedded
Manager and the Kubernetes host): envd's signed requests and WebSockets, the port proxy, and
the bookkeeping that lets a dying sandbox cut every connection into it at once.

A backend says how to find a running sandbox (`_running`; `_find` first learns of one another
replica made), where it answers (`_address`) and with which token (`_token`), and what to do
when its agent fails a request (`_agent_failed`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import aiohttp
import websockets
from yarl import URL

from e2a.sandboxes import envd
from e2a.sandboxes.host import TooManyConnections, Unreachable, Upstream
from e2a.sandboxes.states import EndReason, State

# Open connections into one sandbox (command streams, file transfers, PTYs, proxied requests):
# one more is refused with 429 rather than queued behind the others.
MAX_CONNECTIONS_PER_SANDBOX = 128
# The port proxy gives up on an app that accepts but does not answer: connect, and the gap
# between two reads of its answer (headers or body).
PORT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
AGENT = "the sandbox's agent"
# WebSocket messages from a sandbox (PTY output, a proxied app): at most 4 MiB each and 2
# waiting, so a client that stops reading makes the server hold a few MiB, not hundreds.
WS_MAX_MESSAGE = 4 * 1024 * 1024
# Failures that may mean the sandbox is gone: it refused, dropped or never answered the link.
SANDBOX_SIDE_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                       aiohttp.ServerTimeoutError, asyncio.TimeoutError, ConnectionResetError)


class Connections:
    """Mixed into a SandboxHost whose sandboxes have `id`, `state`, `inflight`, `upstreams`,
    `gone`, `end_reason` and `touch()`, kept in `self.sandboxes`."""

    http: aiohttp.ClientSession
    sandboxes: dict[str, Any]

    def _running(self, sandbox_id: str) -> Any:
        """The sandbox if it runs (and is touched), else NotRunning."""
        raise NotImplementedError

    async def _find(self, sandbox_id: str) -> None:
        """Learn of a sandbox this process does not know yet (replicas: one another made)."""

    async def _live(self, sandbox_id: str) -> Any:
        await self._find(sandbox_id)
        return self._running(sandbox_id)

    def _address(self, sb: Any) -> str:
        raise NotImplementedError

    def _token(self, sb: Any) -> str:
        raise NotImplementedError

    def _agent_failed(self, sb: Any, exc: BaseException) -> None:
        """A request to envd failed on the sandbox's side: is the sandbox still there?"""

    def _closed(self, up: Upstream) -> None:
        sb = self.sandboxes.get(up.sandbox_id)
        if sb is not None:
            sb.upstreams.discard(up)
            sb.touch()

    async def _connect(self, sb: Any, open_: Callable[[], Awaitable[Any]], what: str) -> Upstream:
        """Open a connection into the sandbox, given up on at once if the sandbox goes."""
        if sb.inflight + len(sb.upstreams) >= MAX_CONNECTIONS_PER_SANDBOX:
            raise TooManyConnections(f"sandbox {sb.id} already has "
                                     f"{MAX_CONNECTIONS_PER_SANDBOX} open connections")
        sb.inflight += 1
        attempt = asyncio.ensure_future(open_())
        gone = asyncio.ensure_future(sb.gone.wait())
        try:
            await asyncio.wait({attempt, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sb.inflight -= 1
            gone.cancel()
            if not attempt.done():
                attempt.cancel()
        if not attempt.done() or attempt.cancelled():
            reason = sb.end_reason.value if sb.end_reason else "stopping"
            raise Unreachable(f"the sandbox ended ({reason}) before {what} answered")
        exc = attempt.exception()
        if exc is not None:
            # A failure on our side (the client's upload broke off) says nothing of the sandbox.
            if what == AGENT and isinstance(exc, SANDBOX_SIDE_ERRORS):
                self._agent_failed(sb, exc)
            raise Unreachable(f"{what} did not answer: {exc.__class__.__name__}") from exc
        up = Upstream(sb.id, attempt.result(), self._closed)
        if sb.gone.is_set():
            await up.abort(sb.end_reason or EndReason.CRASHED)
            up.close()
            raise Unreachable(f"the sandbox ended before {what} answered")
        sb.upstreams.add(up)
        return up

    async def agent_request(self, sandbox_id: str, method: str, path: str,
                            **kwargs: Any) -> Upstream:
        sb = await self._live(sandbox_id)
        return await self._connect(sb, lambda: envd.send(
            self.http, self._address(sb), self._token(sb), method, path, **kwargs), AGENT)

    async def agent_websocket(self, sandbox_id: str, path: str,
                              max_size: int = WS_MAX_MESSAGE) -> Upstream:
        sb = await self._live(sandbox_id)
        return await self._connect(sb, lambda: envd.websocket(
            self._address(sb), self._token(sb), path, max_size=max_size, max_queue=2,
            open_timeout=10), AGENT)

    async def port_request(self, sandbox_id: str, port: int, method: str, target: str,
                           **kwargs: Any) -> Upstream:
        sb = await self._live(sandbox_id)
        url = URL(f"http://{self._address(sb)}:{port}{target}", encoded=True)
        return await self._connect(sb, lambda: self.http.request(
            method, url, timeout=PORT_TIMEOUT, **kwargs), f"port {port}")

    async def port_websocket(self, sandbox_id: str, port: int, target: str) -> Upstream:
        sb = await self._live(sandbox_id)
        return await self._connect(sb, lambda: websockets.connect(
            f"ws://{self._address(sb)}:{port}{target}", max_size=WS_MAX_MESSAGE, max_queue=2,
            open_timeout=10), f"port {port}")

    async def logs(self, sandbox_id: str) -> list[dict]:
        """The host's log of the sandbox, and envd's while it runs, in time order."""
        lines = self.hostlog.read(sandbox_id)
        await self._find(sandbox_id)
        sb = self.sandboxes.get(sandbox_id)
        if sb is not None and sb.state is State.RUNNING and self._address(sb):
            sb.touch()
            data = await envd.get_json(self.http, envd.base_url(self._address(sb)) + "/logs",
                                       self._token(sb))
            lines += (data or {}).get("lines", [])
        lines.sort(key=lambda line: line.get("ts", ""))
        return lines
