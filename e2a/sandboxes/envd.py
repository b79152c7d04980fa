"""Talking to a sandbox's in-sandbox agent (envd) over the sandbox's own link.

aiohttp, not httpx, on this path: its C parser makes a proxied request about 3 ms cheaper here
(measured: GET to envd p50 0.85 ms vs 3.4 ms), and an exec round trip is one such request.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from e2a.runtime.runsc import ENVD_PORT

# Errors that mean "could not talk to it", as opposed to an HTTP answer.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def base_url(sandbox_ip: str) -> str:
    return f"http://{sandbox_ip}:{ENVD_PORT}"


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_client() -> aiohttp.ClientSession:
    # One pooled session for all sandboxes: keep-alive connections make an exec round trip a
    # single request on an open socket. No overall timeout: command streams last as long as the
    # command. Bodies pass through untouched (no decompression), as a proxy must.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=64, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def wait_ready(client: aiohttp.ClientSession, sandbox_ip: str, token: str,
                     deadline_s: float = 15.0) -> None:
    """Poll until envd answers /health; it starts a few ms after runsc returns."""
    url = base_url(sandbox_ip) + "/health"
    end = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < end:
        try:
            async with client.get(url, headers=headers(token),
                                  timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return
                last = f"envd health answered {r.status}"
        except TRANSPORT_ERRORS as exc:
            last = exc
        await asyncio.sleep(0.003)
    raise TimeoutError(f"envd did not become ready: {last}")


async def get_json(client: aiohttp.ClientSession, url: str, token: str,
                   timeout: float = 5) -> dict | None:
    """A small GET whose failure is not an error for the caller (None)."""
    try:
        async with client.get(url, headers=headers(token),
                              timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return await r.json() if r.status == 200 else None
    except (*TRANSPORT_ERRORS, ValueError):
        return None
