"""A session's WebSocket through a replica that does not hold the session (docs/kubernetes.md
"Sessions"): relayed to the one that does, whose memory has the session's agent. Frames go
both ways as they are; the holder's refusal (its status and JSON error) or its close (code and
reason) reach the client as the holder gave them.

The session's token is checked here first (an unauthorised connection is refused here, not
passed on) and stays here: the relay is opened with a hop token (api/hop_tokens.py) this
replica signs for this session's WebSocket, from this `after`, to the replica meant, good
once for 30 s. It names that replica (`FORWARDED`): a replica that is not it refuses, and none
relays a relayed connection. No proxy from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from e2a.api import session_protocol as proto
from e2a.api.errors import ApiError, deny_websocket
from e2a.api.hop_tokens import FORWARDED
from e2a.sdk.session import _NoCredentials

log = logging.getLogger("e2a.sessions")
# websockets logs the handshake's headers at DEBUG through the connection's logger: the hop
# token is cut from them
RELAY_LOG = logging.getLogger("e2a.sessions.relay")
RELAY_LOG.addFilter(_NoCredentials())

OPEN_TIMEOUT = 10.0
# The client hears this when the holder goes away mid-stream (as from a replica that stops):
# reconnecting, through any replica, with `after` set to the last seq seen, picks up from there.
HOLDER_GONE = 1012


async def first_of(*tasks: asyncio.Task) -> set[asyncio.Task]:
    """Wait until one of the tasks ends, then cancel the others and wait for them too; the
    tasks that had ended."""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done


def _ws_base(url: str) -> str:
    return "wss" + url[5:] if url.startswith("https") else "ws" + url[4:]


async def relay(ws: WebSocket, session_id: str, url: str, key: int, hop: str,
                subprotocol: bool, after: str) -> None:
    """Serve `ws` (not accepted yet) through the replica at `url`, whose lock key is `key`,
    with the hop token signed for it."""
    try:
        upstream = await connect(
            f"{_ws_base(url)}/v1/sessions/{session_id}/ws?after={after}",
            additional_headers={"Authorization": f"Bearer {hop}", FORWARDED: str(key)},
            subprotocols=[proto.SUBPROTOCOL] if subprotocol else None, proxy=None,
            open_timeout=OPEN_TIMEOUT, max_size=None, compression=None, user_agent_header=None,
            logger=RELAY_LOG)
    except InvalidStatus as exc:
        return await deny_websocket(ws, _refusal(exc.response))
    except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
        log.warning("relaying session %s to %s: %s", session_id, url, exc)
        return await deny_websocket(ws, ApiError(
            503, "session_unavailable", "the e2a replica holding this session did not answer; "
            "try again"))
    try:
        await ws.accept(subprotocol=upstream.subprotocol)
        await _pipe(ws, upstream)
    finally:
        with contextlib.suppress(Exception):
            await upstream.close()


def _refusal(response) -> ApiError:
    """The holder's refusal of the upgrade, as it gave it (its JSON error); but a 409 or 401
    (it is no longer the replica meant, its key changed meanwhile; or it did not take this
    replica's hop token: an older e2a in a rolling upgrade, clocks apart) is for trying again:
    the client's own token was good here."""
    try:
        error = json.loads(response.body or b"")["error"]
        if response.status_code not in (401, 409):
            return ApiError(response.status_code, error["code"], error["message"],
                            error.get("field"))
    except (ValueError, KeyError, TypeError):
        pass
    return ApiError(503, "session_unavailable", "the e2a replica holding this session "
                    f"refused the connection ({response.status_code}); try again")


async def _pipe(client: WebSocket, upstream: ClientConnection) -> None:
    async def down() -> None:
        with contextlib.suppress(ConnectionClosed):
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
            try:
                if msg.get("text") is not None:
                    await upstream.send(msg["text"])
                elif msg.get("bytes") is not None:
                    await upstream.send(msg["bytes"])
            except ConnectionClosed:  # the holder closed: down() passes its close on
                await asyncio.wait([downward])
                return

    downward, upward = asyncio.create_task(down()), asyncio.create_task(up())
    if downward in await first_of(downward, upward):  # the holder closed: its code and reason, or that it went away
        code, reason = upstream.close_code, upstream.close_reason or ""
        if code is None or code in (1005, 1006):
            code, reason = HOLDER_GONE, "the e2a replica holding the session went away"
        with contextlib.suppress(Exception):
            await client.close(code=code, reason=reason)
