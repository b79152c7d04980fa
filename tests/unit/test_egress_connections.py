"""The egress proxy's own cap on open connections per client address (e2a/agents/egress.py):
idle and half-sent connections count, the ones past the cap are closed at once, and the
address gets its room back as its connections close."""

from __future__ import annotations

import asyncio
import socket

from e2a.agents import egress
from e2a.agents.egress import Egress
from tests.e2e.server import free_port


def open_ones(socks: list[socket.socket]) -> int:
    """How many of the connections the server still holds open (a closed one reads EOF)."""
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def test_connections_past_the_cap_are_closed_and_room_comes_back():
    async def go():
        e = Egress({"google": "https://generativelanguage.googleapis.com"}, free_port(),
                   host="127.0.0.1")
        await e.start()
        try:
            socks = []
            for _ in range(egress.MAX_CONNECTIONS + 8):  # none sends a byte
                s = socket.create_connection(("127.0.0.1", e.port))
                socks.append(s)
            await asyncio.sleep(0.5)
            held = open_ones(socks)
            for s in socks:
                s.close()
            await asyncio.sleep(0.5)
            # room again: a request is answered (403: this address holds no grant)
            reader, writer = await asyncio.open_connection("127.0.0.1", e.port)
            writer.write(b"GET /google/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
            return held, answer
        finally:
            await e.stop()
    held, answer = asyncio.run(go())
    assert held == egress.MAX_CONNECTIONS
    assert answer.startswith(b"HTTP/1.1 403")
