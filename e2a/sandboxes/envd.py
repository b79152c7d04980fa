"""Talking to a sandbox's in-sandbox agent (envd) over the sandbox's own link."""

from __future__ import annotations

import asyncio
import time

import httpx

from e2a.runtime.runsc import ENVD_PORT


def base_url(sandbox_ip: str) -> str:
    return f"http://{sandbox_ip}:{ENVD_PORT}"


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_client() -> httpx.AsyncClient:
    # One pooled client for all sandboxes: keep-alive connections make an exec round trip
    # a single request on an open socket. No read timeout: command streams last as long as
    # the command.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=10.0),
        limits=httpx.Limits(max_connections=4096, max_keepalive_connections=1024),
    )


async def wait_ready(client: httpx.AsyncClient, sandbox_ip: str, token: str,
                     deadline_s: float = 15.0) -> None:
    """Poll until envd answers /health; it starts a few ms after runsc returns."""
    url = base_url(sandbox_ip) + "/health"
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            r = await client.get(url, headers=headers(token), timeout=1.0)
            if r.status_code == 200:
                return
            last = RuntimeError(f"envd health answered {r.status_code}")
        except httpx.TransportError as exc:
            last = exc
        await asyncio.sleep(0.003)
    raise TimeoutError(f"envd did not become ready: {last}")
